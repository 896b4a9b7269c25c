"""MemDLM with the transformers Trainer: one device as is, several with torchrun or accelerate launch.

    python examples/memdlm_trainer.py --model path/to/LLaDA-MoE-7B-A1B-Instruct --train_file train.jsonl \
        --memdlm recipe.yaml --output_dir run --max_steps 1000 --per_device_train_batch_size 4
    accelerate launch --config_file examples/accelerate/zero2.yaml examples/memdlm_trainer.py ...   (README)

--model is a checkpoint folder of any built-in family (LLaDA, LLaDA-MoE, LLaDA2.x, Dream, MDLM), loaded
with its native class from the architectures named in its config.json. --load_in_4bit quantises the
base to NF4 (bitsandbytes) for the paper's recipe: a 4-bit base trained through an outer LoRA (set
``outer.lora.apply: true`` in the recipe), with float32 fast weights on the quantised linears.
"""
import json

import torch
from transformers import BitsAndBytesConfig, HfArgumentParser

from bilevel_dlm.integrations import load_pretrained
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments

parser = HfArgumentParser(MemDLMTrainingArguments)
parser.add_argument("--model", required=True, help="a local checkpoint folder of a built-in family")
parser.add_argument("--train_file", required=True, help='JSON lines: {"input_ids": [...], "labels": [...]}')
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
with open(extra.train_file) as lines:
    train = [json.loads(line) for line in lines]
MemDLMTrainer(model, args, train_dataset=train).train()
