"""`python python/train.py ...` is `spin-train ...`: the SPIN trainer's command line
(spin_trainer/cli.py; `python python/train.py --help` lists every option)."""
from spin_trainer.cli import cli

if __name__ == "__main__":
    cli()
