from common.config import run_main
from papers.parm.parm import main

run_main(main)
