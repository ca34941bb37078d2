from common.config import run_main
from papers.diffusion_dpo.diffusion_dpo import main

run_main(main)
