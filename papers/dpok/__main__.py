from common.config import run_main
from papers.dpok.dpok import main

run_main(main)
