from common.config import run_main
from papers.dance_grpo.dance_grpo import main

run_main(main)
