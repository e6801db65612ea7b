"""`deltakd report`: plots, tables and the commands of training runs, eval reports and pipeline
directories, as one self-contained page (collect.py reads, plots.py draws, page.py writes the
HTML, run.py puts them in REPORT/)."""
