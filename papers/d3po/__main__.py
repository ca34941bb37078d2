from common.config import run_main
from papers.d3po.d3po import main

run_main(main)
