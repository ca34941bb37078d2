from common.config import run_main
from papers.hps.hps import main

run_main(main)
