"""trainer.py with every change this process makes under some folders recorded (Python's audit hooks: opening a
file to write, creating, renaming, removing, linking); tests/test_distributed.py runs it under torchrun to list
what each rank wrote:

    torchrun ... tests/audited_trainer.py LOG_DIR FOLDER[:FOLDER...] TRAINER_FLAGS...

LOG_DIR/rank<RANK>.txt: one line per change, "<event> <absolute path>".
"""
import os
import runpy
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1] / "trainer.py"
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.truncate", "os.chmod",
           "os.utime", "shutil.rmtree", "shutil.move")


def main() -> None:
    log_dir, watched, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    folders = [resolve(folder) + os.sep for folder in watched.split(os.pathsep)
               for resolve in (os.path.abspath, os.path.realpath)]
    log = os.open(os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}.txt"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(event: str, args: tuple) -> None:
        if event == "open":
            paths = [args[0]] if isinstance(args[2], int) and args[2] & WRITES else []
        elif event in CHANGES:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if isinstance(path, (str, os.PathLike)):
                absolute = os.path.abspath(os.fspath(path))
                if any((absolute + os.sep).startswith(folder) for folder in folders):
                    os.write(log, f"{event} {absolute}\n".encode())

    sys.addaudithook(record)
    sys.argv = [str(TRAINER), *flags]
    sys.path.insert(0, str(TRAINER.parent))  # as `python trainer.py` has it
    runpy.run_path(str(TRAINER), run_name="__main__")


if __name__ == "__main__":
    main()
