from common.config import run_main
from papers.ar_cot_guided.ar_cot_guided import main

run_main(main)
