from common.config import run_main
from papers.ddpo.ddpo import main

run_main(main)
