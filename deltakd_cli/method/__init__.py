"""The method's math, pure functions over tensors and no I/O: the cache's target rules
(`rules`), the sampled tail's draws (`sampling`), the targets (`targets`), what a loss is asked
for (`spec`), the target view every objective is a divergence over (`view`), the divergences
(`divergences`), the objective registry (`objectives`) and the fidelity references
(`fidelity`)."""
