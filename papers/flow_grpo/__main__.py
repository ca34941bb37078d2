from common.config import run_main
from papers.flow_grpo.flow_grpo import main

run_main(main)
