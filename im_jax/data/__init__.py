"""Data pipeline: sources -> conversations -> token kinds -> loss weights -> packed batches."""

from im_jax.data.conversation import ROLES, Conversation, DataError, Message
from im_jax.data.sources import FORMATS, LoadedDataset, iter_conversations, load_conversations
from im_jax.data.stats import DatasetStats, compute_stats
# Templates, loss weights and encoding (light imports). The grain pipeline is
# `im_jax.data.pipeline` (imported on its own: grain takes ~1 s to import).
from im_jax.data.encode import EncodeConfig, Encoder, EncodeStats
from im_jax.data.templates import ChatTemplate, TemplateConfig
from im_jax.data.weights import LossMaskConfig
