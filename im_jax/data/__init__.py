"""Data pipeline: sources -> conversations -> token kinds -> loss weights -> packed batches."""

from im_jax.data.conversation import ROLES, Conversation, DataError, Message
from im_jax.data.sources import FORMATS, LoadedDataset, iter_conversations, load_conversations
from im_jax.data.stats import DatasetStats, compute_stats
