"""Teacher server settings: from the environment (OPD_TEACHER_*), overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from opd.bundled import TEACHER_PATH, DeviceName
from shared.client import checked_api_key
from shared.flags import EMPTY_HOST, MAX_THREADS


class TeacherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_TEACHER_", extra="forbid")

    model: str = Field(str(TEACHER_PATH), description="Local folder of a Hugging Face causal LM.")
    # NoDecode: the environment gives names as vLLM's command line does, space-separated, not JSON.
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The model's names in the /v1 routes, as vLLM's flag (space-separated in the "
        "environment): requests may use any, responses give the first (unset: the folder path, or "
        "its last part, e.g. tiny-teacher).",
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="hf: transformers; vllm: vLLM engine.")
    device: DeviceName = Field("cpu", description="cpu, cuda or cuda:N (hf backend).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    # At least 2: the shortest sequence there is to score, a prompt token and a completion token.
    max_batch_tokens: int = Field(
        16384, ge=2, description="Token budget of one forward batch (rows x longest row)."
    )
    max_seq_len: int | None = Field(
        None,
        ge=2,
        description="Longest prompt + scored tokens (unset: the model's positions, less one with "
        "the vllm backend; with the hf backend at most --max-batch-tokens).",
    )
    max_top_k: int = Field(20, ge=0, description="Largest top_k a request may ask for.")
    max_queue_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens queued before 429s: waiting for a batch (hf), or waiting or being "
        "scored (vllm). An empty queue takes a request of any size, and a refused request "
        "claims its room (small ones wait) until it comes back, so none is refused forever. "
        "Default 8 x max_batch_tokens.",
    )
    max_body_mb: float = Field(
        64.0,
        ge=1 / 1024,  # a KiB: 1e-9 MiB would be a limit of 0 bytes, every request a 413
        le=1 << 20,  # a TiB: whatever a byte count may hold, and more than any body will be
        allow_inf_nan=False,
        description="Largest request body, in MiB (else 413).",
    )
    api_key: SecretStr | None = Field(
        None, description="If set, requests need 'Authorization: Bearer KEY'."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (vllm backend).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory vLLM may take (vllm backend)."
    )
    threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="torch CPU threads (default: torch's)."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the model.")
    share_prompts: bool = Field(
        True,
        description="hf backend: run a prompt that several sequences of a batch share (a trainer's "
        "samples of it) once, their completions on copies of its KV cache; the same numbers within "
        "float rounding.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and uvicorn."
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        # An empty OPD_TEACHER_API_KEY (as compose passes an unset variable) means no key.
        return None if value in ("", None) else value

    @field_validator("api_key")
    @classmethod
    def _sendable_key(cls, key: SecretStr | None) -> SecretStr | None:
        # A key no client can send (a newline from a file, a space) would refuse every request.
        if key is not None:
            checked_api_key(key.get_secret_value())
        return key

    @field_validator("host")
    @classmethod
    def _some_host(cls, host: str) -> str:
        if not host.strip():
            raise ValueError(EMPTY_HOST)
        return host

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names_from_text(cls, value):
        # From the environment, "a b" is two names and "" (compose's unset variable) none.
        return value.split() if isinstance(value, str) else value

    @field_validator("served_model_name")
    @classmethod
    def _distinct_names(cls, names: list[str]) -> list[str]:
        names = [name.strip() for name in names]
        if not all(names):
            raise ValueError("a served model name must not be empty")
        return list(dict.fromkeys(names))  # each once, in the order given

    @property
    def served_names(self) -> tuple[str, ...]:
        """The names a /v1 request may give the model; /v1/models lists the served ones (or the
        folder), and responses give the first."""
        if self.served_model_name:
            return tuple(self.served_model_name)
        return tuple(dict.fromkeys((self.model, Path(self.model).name)))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
