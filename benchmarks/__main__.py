import sys

if sys.argv[1:2] == ["gpu-check"]:  # argparse only: runs with the system Python of a bare GPU machine (no typer)
    from benchmarks.gpu_check import cli

    cli(sys.argv[2:])
else:
    from benchmarks.cli import app

    app()
