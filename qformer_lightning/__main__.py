"""``python -m qformer_lightning``: the LightningCLI entry point."""

from qformer_lightning.cli import main

if __name__ == "__main__":
    main()
