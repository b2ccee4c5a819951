"""Decoding with `generate`: ids for the update rules, texts in dataset order for evaluation."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def generate(model, batch: dict, *, max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
             num_return_sequences: int = 1, temperature: float = 1.0, length_penalty: float = 1.0) -> torch.Tensor:
    """Output ids (decoder start token first) for a padded batch; the model is put in eval mode."""
    was_training = model.training
    model.eval()
    kwargs = dict(do_sample=do_sample, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                  num_beams=num_beams, length_penalty=length_penalty)
    if do_sample:  # leave top-k/top-p at "off" so samples come from p_theta itself
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    model.train(was_training)
    return out


def to_texts(tokenizer, ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)]


def translate(model, tokenizer, sources: list[str], decode_cfg, *, source_prefix: str = "",
              max_source_length: int = 512, progress: bool = False, desc: str = "decode") -> list[str]:
    """Hypotheses for `sources`, in their order. Sorting by length keeps padding (and time) low."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hyps: list[str] = [""] * len(sources)
    size = decode_cfg.batch_size
    for start in tqdm(range(0, len(order), size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + size]
        enc = tokenizer([source_prefix + sources[i] for i in idx], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_source_length).to(device)
        out = generate(model, enc, max_new_tokens=decode_cfg.max_new_tokens, num_beams=decode_cfg.num_beams,
                       length_penalty=decode_cfg.length_penalty)
        for i, text in zip(idx, to_texts(tokenizer, out)):
            hyps[i] = text
    return hyps
