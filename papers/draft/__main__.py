from common.config import run_main
from papers.draft.draft import main

run_main(main)
