"""lmforge: train and compress generative language models on Kubernetes with DeepSpeed."""

__version__ = "0.1.0"

API_GROUP = "lmforge.dev"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
