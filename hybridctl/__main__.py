from hybridctl.cli import run

run()
