"""`deltakd init-student`: make a base student S0 from a larger model of the same family.

Two steps (docs/method.md, "What the base student must be"):
1. prune: keep some of the source's decoder layers and copy them, with the embeddings, final
   norm and output layer, into a model of fewer layers (a Hugging Face directory);
2. heal: distil the source into the copy on unlabelled text, reusing the tool's own stages: a
   cache whose base and tuned teachers are both the source (Delta is then 0 and the cache holds
   a plain KD target), then `distill --objective kd`.

A pruned copy used as is is a poor S0 for Delta-KD (the delta target is the student's own
distribution shifted, so its noise is kept); healed, it is a competent language model again.
"""
