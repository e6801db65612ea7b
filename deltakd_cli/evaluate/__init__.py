"""The evaluation stage: `deltakd eval` (run.py) generates under a protocol (protocol.py,
generate.py), scores ROUGE-L the field's way (rouge.py), and reports the spread and the paired
differences (stats.py, report.py); predictions.py reads generations made elsewhere."""
