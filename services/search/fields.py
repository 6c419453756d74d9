"""The collection's fields and the names callers use for them."""
from __future__ import annotations

# Caller-facing output field name -> Milvus field.
OUTPUT_FIELDS: dict[str, str] = {
    "uri": "uri",
    "caption": "caption",
    "keywords": "keywords",
    "metadata": "metadata",
    "embedder_model_id": "embedder_model_id",
    "captioner_model_id": "captioner_model_id",
    "ingested_at": "ingested_at_ms",
    "caption_pending": "caption_pending",
}
IMAGE_VECTOR = "image_vector"
CAPTION_VECTOR = "caption_vector"
MAX_ID_CHARS = 256
MAX_URI_CHARS = 2048
MAX_CAPTION_CHARS = 4096
MAX_KEYWORDS = 32
MAX_KEYWORD_CHARS = 128
# A BOOL field: the caption is deferred (the captioner failed); filterable
# (`caption_pending == true`). Absent from collections made before deferred captions.
CAPTION_PENDING = "caption_pending"
# The keyword leg: caption + keywords as analysed text, and the BM25 sparse vector Milvus
# computes from it (a BM25 function). Absent from collections made before the keyword leg.
KEYWORD_TEXT = "keyword_text"
KEYWORD_SPARSE = "keyword_sparse"
MAX_KEYWORD_TEXT_CHARS = 8192
# The tenant an item belongs to: a partition-key VARCHAR (each tenant's searches scan only
# its partitions). The server sets and filters it; caller filters may not name it. Absent
# from collections made before tenants (those serve the default tenant only).
TENANT = "tenant"
MAX_TENANT_CHARS = 64
# Stored primary key of a non-default tenant's item: "<tenant>~<id>" ("~" is outside the
# id alphabet, so keys never collide); the default tenant's items keep the plain id.
TENANT_KEY_SEPARATOR = "~"
MAX_KEY_CHARS = MAX_ID_CHARS + MAX_TENANT_CHARS + 1
