"""Names the unused-code check (vulture, run by .ci/run) cannot see used, each with why it stays.

Vulture reads this file as code that uses the names below. Add a name here only with its reason;
anything else it reports is dead code to delete.
"""

# ruff: noqa: B018, F821
# Called by Python or a framework, never by our code:
_.find_class  # pickle.Unpickler hook (scaletrain/checkpoint/safe_io.py)
frame  # signal handler signature (scaletrain/checkpoint/faults.py)
out_shape  # torch.utils.flop_counter passes it by keyword to registered formulas
grad_shape  # the same, first positional argument of the backward formula
pytest_collection_modifyitems  # pytest hook (tests/conftest.py)

# Read by a library through attribute or parameter names:
_.get_emb  # megatron-core's RotaryEmbedding calls it (scaletrain/recipes/gpt/megatron.py overrides it)
_.core_attention  # megatron-core's layer spec field: the module class its attention builds
_.__class__  # the model's rotary module re-typed to that subclass (megatron.py)
_.pre_tokenizer  # tokenizers.Tokenizer property, set to configure it (scaletrain/data/tokenizer.py)
T_BUCKET  # Triton autotune keys: kernel arguments that only select a tuned config
S_BUCKET
_.branch7x7dbl_1  # Inception-v3 submodules: their names are the state-dict keys of the weight files
_.branch7x7dbl_2
_.branch7x7dbl_3
_.branch7x7dbl_4
_.branch7x7dbl_5
_.Mixed_5b
_.Mixed_5c
_.Mixed_5d
_.Mixed_6a
_.Mixed_6b
_.Mixed_6c
_.Mixed_6d
_.Mixed_6e
_.Mixed_7a
_.Mixed_7b
_.Mixed_7c
_rms_norm_fwd  # registered as torch custom-op implementations by decorator (scaletrain/kernels/sharding.py)
_rms_norm_bwd
_layer_norm_fwd
_layer_norm_bwd
_swiglu_fwd
_swiglu_bwd
_attention_fwd
_attention_bwd
_rope

# Dataclass fields read through dataclasses.asdict (scaletrain/plan/memory.py: ModelStateBytes.total):
gradients
pipeline_buffers

# Found by name from outside Python:
RECIPE  # pyproject's scaletrain.recipes entry points
DIT
UNET
VAE
description  # job.description: a config field, stored with the run's config
slurm_cluster  # pytest fixtures, requested by parameter name or autouse
_no_process_group
one_thread
_triton_runs

# Read by DeepSpeed 0.19.8: reset so ZeRO-1/2 relink optimizer-state views (scaletrain/engines/deepspeed_engine.py)
_._hp_optimizer_states_linked
