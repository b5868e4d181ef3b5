"""``python -m robaudit`` (and ``torchrun -m robaudit``) run the command line."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="robaudit")
