"""MemDLM with the transformers Trainer: one device as is, several with torchrun or accelerate launch.

    python examples/memdlm_trainer.py --model path/to/LLaDA-MoE-7B-A1B-Instruct --train_file train.jsonl \
        --memdlm recipe.yaml --output_dir run --max_steps 1000 --per_device_train_batch_size 4
    accelerate launch --config_file examples/accelerate/zero2.yaml examples/memdlm_trainer.py ...   (README)

--model is a checkpoint folder of any built-in family (LLaDA, LLaDA-MoE, LLaDA2.x, Dream, MDLM), loaded
with its native class from the architectures named in its config.json, and its tokenizer when the folder has
one. --train_file is read by bilevel_dlm.finetune_data: a .json / .jsonl / .parquet / .csv file, a
save_to_disk folder or a hub name, in any of its formats (messages, alpaca, prompt_completion, text, token
records), chats encoded with the tokenizer's chat template (--no_chat_template for base models) under
--max_length / --truncation, padded with supervised EOS. --load_in_4bit quantises the base to NF4
(bitsandbytes) for the paper's recipe: a 4-bit base trained through an outer LoRA (set
``outer.lora.apply: true`` in the recipe), with float32 fast weights on the quantised linears.
"""
from functools import partial
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, HfArgumentParser

from bilevel_dlm.checkpoint import load_tokenizer
from bilevel_dlm.finetune_data import (FORMATS, TRUNCATIONS, EncodingOptions, encode_dataset, eos_pad_collate,
                                       load_records)
from bilevel_dlm.integrations import load_pretrained
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments

parser = HfArgumentParser(MemDLMTrainingArguments)
parser.add_argument("--model", required=True, help="a local checkpoint folder of a built-in family")
parser.add_argument("--train_file", required=True, help="records: a data file, a save_to_disk folder or a hub name")
parser.add_argument("--format", choices=FORMATS, help="record format (default: detected per record)")
parser.add_argument("--max_length", type=int, help="length policy limit (default: none)")
parser.add_argument("--truncation", choices=TRUNCATIONS, default="filter", help="a longer record: filter, right, error")
parser.add_argument("--no_chat_template", action="store_true", help="encode <bos> prompt response <eos> (base models)")
parser.add_argument("--supervise", choices=("last", "all"), default="last", help="assistant turns to supervise")
parser.add_argument("--document_mask", action="store_true", help="text records: packed documents kept apart")
parser.add_argument("--num_proc", type=int, help="processes that encode the records (datasets.map)")
parser.add_argument("--load_in_4bit", action="store_true", help="NF4 4-bit base (needs an outer LoRA)")
args, extra = parser.parse_args_into_dataclasses()

if extra.load_in_4bit:
    if not args.memdlm.outer.lora.apply:
        parser.error("--load_in_4bit trains through an outer LoRA: set outer.lora.apply: true in the --memdlm recipe")
    from peft import prepare_model_for_kbit_training

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = prepare_model_for_kbit_training(load_pretrained(extra.model, quantization_config=quantization),
                                            use_gradient_checkpointing=False)
else:
    model = load_pretrained(extra.model)
folder = Path(extra.model)
tokenizer = load_tokenizer(folder) if (folder / "tokenizer_config.json").exists() else None
options = EncodingOptions(format=extra.format, max_length=extra.max_length, truncation=extra.truncation,
                          chat_template=False if extra.no_chat_template else None, supervise=extra.supervise,
                          document_mask=extra.document_mask)
with args.main_process_first(desc="encoding the records"):  # rank 0 writes datasets' cache, the others read it
    train, report = encode_dataset(load_records(extra.train_file), tokenizer, options, source=extra.train_file,
                                   num_proc=extra.num_proc)
print(f"{extra.train_file}: {report.line()}")
collator = partial(eos_pad_collate, eos_token_id=tokenizer.eos_token_id) if tokenizer is not None else None
MemDLMTrainer(model, args, train_dataset=train, data_collator=collator, processing_class=tokenizer).train()
