"""Public checkpoints in and out: import (safetensors -> orbax + experiment file), export, parity check."""
