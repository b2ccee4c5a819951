"""The steering benchmark (mleps_lab/steer.py): python scripts/bench_steer.py --base CKPT --out DIR [--report P]."""
from mleps_lab.steer import main

if __name__ == "__main__":
    main()
