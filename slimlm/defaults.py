"""Names the command line needs before it imports PyTorch (so `slimlm --help` starts at once)."""

DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct (slimlm.models.loading.EMBEDDED_MODELS)
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the dtypes a model loads in (slimlm.models.loading.DTYPES)
