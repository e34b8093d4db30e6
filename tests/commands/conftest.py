from lm_fixtures import *  # noqa: F403  (tokenizer, tiny model, model directory, held-out JSONL)
