"""Compiler launcher that keeps ptxas' resource report: runs the compile command it is given and copies its
stderr into LOG_DIR/<object name>.log (the build output stays as it was).

    CMAKE_CUDA_COMPILER_LAUNCHER="python3;csrc/dev/ptxas_capture.py;LOG_DIR"  (set by CMakeLists.txt)

csrc/dev/ptxas_table.py then reads LOG_DIR. Standard library only.
"""
import os
import subprocess
import sys


def main() -> int:
    log_dir, cmd = sys.argv[1], sys.argv[2:]
    obj = cmd[cmd.index("-o") + 1] if "-o" in cmd[:-1] else "compile"
    os.makedirs(log_dir, exist_ok=True)
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    with open(os.path.join(log_dir, os.path.basename(obj) + ".log"), "w") as f:
        f.write(proc.stderr)
    # ptxas' info lines go to the log only; warnings and errors still reach the build output
    sys.stderr.write("".join(line for line in proc.stderr.splitlines(keepends=True)
                             if not line.startswith("ptxas info") and "bytes stack frame" not in line))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
