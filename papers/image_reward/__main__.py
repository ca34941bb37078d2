from common.config import run_main
from papers.image_reward.image_reward import main

run_main(main)
