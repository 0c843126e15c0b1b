"""A real Hugging Face chat tokenizer built offline for the data and training tests: byte-level BPE
(the ``tokenizers`` library, trained here on a few sentences) with ChatML special tokens and a ChatML
chat template, like SmolLM2-Instruct's (eos ``<|im_end|>``).  Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CORPUS = [
    "system user assistant you are a helpful assistant",
    "what is two plus two ? four . three times three is nine",
    "hello world , how are you today ? fine thanks",
    "name a colour : red green blue yellow",
    "0 1 2 3 4 5 6 7 8 9 10 12 16 20 25 30",
]


def chatml_tokenizer(template: str | None = CHATML):
    """A ``PreTrainedTokenizerFast`` with ChatML specials (pad ``<|endoftext|>``, eos ``<|im_end|>``, no
    bos) and ``template`` as its chat template (None: no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tokenizer.chat_template = template
    return tokenizer


def save_chatml_tokenizer(directory: str | Path, template: str | None = CHATML) -> Path:
    """``chatml_tokenizer(template)`` saved to ``directory`` (what ``model.tokenizer`` may point at)."""
    directory = Path(directory)
    chatml_tokenizer(template).save_pretrained(directory)
    return directory
