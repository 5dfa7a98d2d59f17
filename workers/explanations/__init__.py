"""Feature explanations: written (by an LLM endpoint or offline), classified reward-related or
not, and scored by what they predict about activations and about the reward.

prompts.py builds what the endpoint reads; explainers.py writes and classifies; evidence.py reads
a layer's held-out texts once (activations, per-text Δ reward when a feature or a random direction
is zeroed); scorers.py turns those into detection, fuzzing, embedding and causal scores, each
beside its baselines; task.py is the `explanations` job.
"""
