"""
The transformers classes of an exported model: a config and a causal LM around model.GPT.

export_hf.py copies this file into each folder it writes, beside a verbatim copy of the repository's
model.py, which it imports: the network transformers runs is our code, not a port of it. It is not
imported from the repository itself (the relative import only resolves inside an exported folder).

Generation is transformers' own (GenerationMixin, with all its options), recomputing the whole window
at every step (no key/value cache through transformers), cropped to the last block_size tokens as
engine.py's generate_stream does (sample.py, serve.py), so greedy decoding gives the same tokens as
ours. Padding is supported on the right only, and for scoring (forward) only: the model has
no attention mask, and with causal attention right padding cannot change the logits of the real tokens
before it; generate() refuses a padded batch, since its new tokens would come after the padding.
"""
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import GPT, GPTConfig


class FixedCodeGPTConfig(PretrainedConfig):
    """Every GPTConfig field, under its own name, plus what transformers keeps in every config."""
    model_type = "fixed_code_gpt"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "block_size"}

    def __init__(self, **kwargs):
        for field in fields(GPTConfig):
            setattr(self, field.name, kwargs.pop(field.name, field.default))
        kwargs.setdefault("tie_word_embeddings", False)  # untied lm_head, and no input table to tie it to
        super().__init__(**kwargs)

    def gpt_config(self):
        return GPTConfig(**{field.name: getattr(self, field.name) for field in fields(GPTConfig)})


class FixedCodeGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FixedCodeGPTConfig
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(config.gpt_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.gpt.embed

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, **kwargs):
        """Logits of every position; with labels (the inputs, -100 where ignored), the mean next-token loss."""
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("this model has no attention mask, so no token may follow padding: pad batches on the "
                             "right (tokenizer.padding_side = 'right') to score them, or run rows of different "
                             "lengths one at a time")
        logits, _ = self.gpt(input_ids)
        loss = None
        if labels is not None:  # transformers' convention: position t is scored on labels[t + 1]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):  # at the first step, before a wrong token
            raise ValueError("generate() cannot take a padded batch: this model has no attention mask, and the new "
                             "tokens would follow the padding (on either side); generate from rows of different "
                             "lengths one at a time, or in batches of equal length")
        window = self.config.block_size
        return {"input_ids": input_ids[:, -window:],
                "attention_mask": None if attention_mask is None else attention_mask[:, -window:]}

    @torch.no_grad()
    def _init_weights(self, module):
        """from_pretrained builds the model on the meta device, loads model.safetensors, and then calls
        this on every module holding a tensor it did not load. Those are only model.py's non-persistent
        buffers (rotary tables, the input code's bit indices), which follow from the config alone: copy
        them from a model of the same config with one block, built on the CPU. Loaded weights and the
        code's persistent buffers (A and b, perm, codebook, ...) are never touched."""
        if not module._non_persistent_buffers_set:
            return
        prefix = next(name for name, m in self.gpt.named_modules() if m is module)
        if not hasattr(self, "_fresh_buffers"):
            with torch.device("cpu"):
                fresh = GPT(replace(self.config.gpt_config(), n_layer=1))  # the fewest blocks a GPT has
            self._fresh_buffers = {f"{name}.{b}".lstrip("."): getattr(m, b) for name, m in fresh.named_modules()
                                   for b in m._non_persistent_buffers_set}
        for name in module._non_persistent_buffers_set:
            key = f"{prefix}.{name}".lstrip(".")
            if key not in self._fresh_buffers:
                raise RuntimeError(f"model.py's non-persistent buffer {key} is not rebuilt by the exported modeling code")
            getattr(module, name).copy_(self._fresh_buffers[key])
