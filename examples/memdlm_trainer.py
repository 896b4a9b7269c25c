"""MemDLM with the transformers Trainer: one device as is, several with torchrun or accelerate launch.

    python examples/memdlm_trainer.py --model path/to/LLaDA-MoE-7B-A1B-Instruct --train_file train.jsonl \
        --memdlm recipe.yaml --output_dir run --max_steps 1000 --per_device_train_batch_size 4
    torchrun --nproc_per_node 8 examples/memdlm_trainer.py ...        (README: "Multi-GPU")

--model is a checkpoint folder of any built-in family (LLaDA, LLaDA-MoE, Dream, MDLM), loaded with its
native class from the architectures named in its config.json.
"""
import json

from transformers import HfArgumentParser

from bilevel_dlm.integrations import load_pretrained
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments

parser = HfArgumentParser(MemDLMTrainingArguments)
parser.add_argument("--model", required=True, help="a local checkpoint folder of a built-in family")
parser.add_argument("--train_file", required=True, help='JSON lines: {"input_ids": [...], "labels": [...]}')
args, extra = parser.parse_args_into_dataclasses()

model = load_pretrained(extra.model)
with open(extra.train_file) as lines:
    train = [json.loads(line) for line in lines]
MemDLMTrainer(model, args, train_dataset=train).train()
