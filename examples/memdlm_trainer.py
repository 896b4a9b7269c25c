"""MemDLM with the transformers Trainer: one device as is, several with torchrun or accelerate launch.

    python examples/memdlm_trainer.py --model path/to/LLaDA-8B-Instruct --train_file train.jsonl \
        --memdlm recipe.yaml --output_dir run --max_steps 1000 --per_device_train_batch_size 4
    torchrun --nproc_per_node 8 examples/memdlm_trainer.py ...        (README: "Multi-GPU")
"""
import json

from transformers import HfArgumentParser

from bilevel_dlm.integrations.llada import LLaDAModelLM
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments

parser = HfArgumentParser(MemDLMTrainingArguments)
parser.add_argument("--model", required=True, help="a local checkpoint folder")
parser.add_argument("--train_file", required=True, help='JSON lines: {"input_ids": [...], "labels": [...]}')
args, extra = parser.parse_args_into_dataclasses()

model = LLaDAModelLM.from_pretrained(extra.model)
with open(extra.train_file) as lines:
    train = [json.loads(line) for line in lines]
MemDLMTrainer(model, args, train_dataset=train).train()
