"""The training stage: `distill` (from the teachers' cache) and `finetune` (from rows), one loop
(loop.py) over batches (batching.py) of what inputs.py opens, with the objective module
(objective.py), the step (step.py), checkpoints (checkpoint.py) and the export (export.py)."""
