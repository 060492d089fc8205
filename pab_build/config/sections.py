"""The config's sections: one pydantic model per part of the build, and :class:`PABConfig`, the
whole profile. Every field has a comment saying what it is; loading and overrides are in
:mod:`pab_build.config`."""


from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from ..redact import redact

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
PROMPTS_DIR = REPO_ROOT / "prompts"


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the same value always gives the same hash."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _get_dotted(data: dict, key: str) -> Any:
    return functools.reduce(lambda cur, part: cur[part], key.split("."), data)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


class Section(BaseModel):
    # strict: `true` is not a number and "2" is not an int; no NaN or infinity in any float
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelSpec(Section):
    """Where a model comes from: a hub id (``org/name``) or a local folder, plus a pinned revision."""

    path: str  # hub id or local path (relative paths resolve against the config file's folder)
    revision: str | None = None  # hub revision; recorded in every sample's metadata
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class ModelsConfig(Section):
    sdxl: ModelSpec  # RealVisXL V4.0 in `full`
    qwen2_vl: ModelSpec  # Qwen2-VL instruct model (captions and attribute questions)
    openpose: ModelSpec  # controlnet-aux annotators folder (body_pose_model.pth) or hub id
    resnet50: ModelSpec  # "torchvision:IMAGENET1K_V2" or a local safetensors state dict
    swin: ModelSpec  # CMP image encoder initialisation
    bert: ModelSpec  # CMP text/cross encoder initialisation and tokenizer
    safety_checker: ModelSpec = ModelSpec(path="CompVis/stable-diffusion-safety-checker")  # generate.content_filter's; not in the paper


class FixturesConfig(Section):
    """Tiny models and sample clips the project builds itself (smoke profile and tests)."""

    build_tiny_models: bool = False  # build tiny models into `models_dir` before the build starts
    build_sample_oops: bool = False  # write the bundled sample OOPS! root into `sample_oops_dir`
    models_dir: str = "~/.cache/pab-build/tiny-models"
    sample_oops_dir: str = "~/.cache/pab-build/sample-oops"
    seed: int = 0


class RunConfig(Section):
    seed: int = 0  # base seed for everything random
    device: str = "cpu"  # "cpu", "cuda", "cuda:0"; GPU stages fall back to nothing: a wrong device is an error
    task_runner: Literal["threads", "ray"] = "threads"
    max_workers: int = Field(2, ge=1)  # threads for the default runner
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads per process (None = torch's default)
    ray_address: str | None = None  # None = start a local Ray cluster
    gpus_per_unit: float = Field(1.0, ge=0)  # Ray: GPUs a unit of a GPU stage asks for
    cpus_per_unit: float = Field(1.0, ge=0)  # Ray: CPUs every unit asks for
    # Ray: the GPU share of one actor of these GPU stages (others: gpus_per_unit). OpenPose and ResNet-50
    # hold well under 1 GB and wait on image decoding between batches: two actors per card keep it busy
    ray_gpu_share: dict[str, float] = {"pose": 0.5, "gen_pose": 0.5, "pairs": 0.5}
    unit_retries: int = Field(2, ge=0)  # Prefect retries of a failing unit before it is recorded as rejected
    retry_delay_s: float = Field(1.0, ge=0)
    trust_remote_code: bool = False  # never on unless the user opts in
    # devices GPU stages spread their units over, one worker process each (without Ray); None:
    # every visible GPU when device is "cuda", else just `device`. [cpu, cpu] tests it on a CPU.
    devices: list[str] | None = None
    log_unit_runs: bool = False  # Prefect's own lines for every unit's task run (61k units: off by default)
    # units per stage allowed to stay failed after their retries: an int (count) or a fraction in [0, 1)
    # of the stage's units; above it the stage, the build and `pab run` end failed (exit 1)
    max_failed_units: int | float = Field(0, ge=0)
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # GPU share vLLM reserves; preflight checks the other models fit
    models_lock: str | None = None  # models.lock.json (`pab models fetch`); None = next to the profile's YAML
    lock_heartbeat_s: float = Field(30.0, gt=0)  # OUT lock: heartbeat period; stale after 4 missed beats


class OopsConfig(Section):
    root: str | None = None  # OOPS!-format root; None = the bundled sample root (fixtures.sample_oops_dir)
    splits: list[Literal["train", "val"]] = ["train", "val"]
    min_rel_t: float = Field(0.01, ge=0, le=1)  # official loader: drop clips whose median rel_t is outside [min, max]
    max_rel_t: float = Field(0.99, ge=0, le=1)
    min_len_s: float = Field(3.2, ge=0)  # official loader: drop clips shorter/longer than this
    max_len_s: float = Field(30.0, gt=0)
    limit: int | None = Field(None, ge=1)  # take the first N clips (sorted by name) after filtering

    @model_validator(mode="after")
    def _ranges_ordered(self):
        if self.min_rel_t > self.max_rel_t:
            raise ValueError(f"min_rel_t ({self.min_rel_t}) is above max_rel_t ({self.max_rel_t})")
        if self.min_len_s > self.max_len_s:
            raise ValueError(f"min_len_s ({self.min_len_s}) is above max_len_s ({self.max_len_s})")
        return self


class FramesConfig(Section):
    clips_per_unit: int = Field(16, ge=1)
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_side: int | None = Field(None, ge=16)  # downscale frames whose longer side exceeds this
    decode_timeout_s: float = Field(60.0, gt=0)  # a video whose probe + decode of one clip takes longer is rejected


class PoseConfig(Section):
    detect_resolution: int = Field(512, ge=32)  # OpenPose input size
    image_resolution: int = Field(512, ge=32)  # rendered pose map size
    batch_size: int = Field(8, ge=1)
    clips_per_unit: int = Field(32, ge=1)
    require_person: bool = True  # reject frames in which OpenPose finds nobody
    min_person_height: float = Field(0.25, ge=0)  # tallest person's body height / frame height (docs/pose-rules.md)
    network_height: int = Field(184, ge=32)  # network input rows; 184 = controlnet-aux's own (docs/pose-rules.md)
    hand_and_face: bool = False
    postprocess: Literal["torch", "controlnet_aux"] = "torch"  # models/pose_postprocess.py (same keypoints) or controlnet-aux's


class PairsConfig(Section):
    max_cosine: float = Field(0.95, ge=-1, le=1)  # reject pairs whose ResNet-50 cosine is above this
    batch_size: int = Field(16, ge=1)
    clips_per_unit: int = Field(64, ge=1)
    image_size: int = Field(224, ge=32)


class ReviewConfig(Section):
    policy: Literal["accept_all", "decisions_file", "wait"] = "accept_all"
    decisions_files: list[str] = []  # one file per reviewer (CSV or JSONL); merged: all must accept
    wait_timeout_s: int = Field(7 * 24 * 3600, ge=1)  # how long `wait` pauses the flow


class QCConfig(Section):
    """Test-caption quality control: ``none`` keeps the generated captions as they are (stated in the
    log and the card), ``decisions_file`` applies the correction files in ``files``, ``wait`` pauses
    the test branch after ``test_captions`` until correction files are given (then reruns it)."""

    policy: Literal["none", "decisions_file", "wait"] = "none"
    files: list[str] = []  # caption correction files (CSV or JSONL: sample_key, caption)
    wait_timeout_s: int = Field(7 * 24 * 3600, ge=1)


class GenerationSettings(Section):
    """Settings passed to Qwen2-VL generate()."""

    max_new_tokens: int = Field(96, ge=1)
    do_sample: bool = False  # greedy by default, as captions must be reproducible
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    min_pixels: int = Field(64 * 28 * 28, ge=1)
    max_pixels: int = Field(1024 * 28 * 28, ge=1)
    backend: Literal["transformers", "vllm"] = "transformers"


class CaptionsConfig(Section):
    generation: GenerationSettings = GenerationSettings()
    images_per_unit: int = Field(64, ge=1)
    min_words: int = Field(3, ge=0)  # shorter outputs are rejected as empty
    max_words: int = Field(80, ge=1)  # longer ones as runaway (the prompt asks for <= 50)
    reject_unfinished: bool = True  # reject outputs that hit max_new_tokens without ending (runaway)...
    trim_min_words: int = Field(8, ge=1)  # ...unless their whole sentences keep this many words (trimmed)
    # deprecated, kept so older profiles load: use the `qc` section (qc.policy, qc.files)
    qc_policy: Literal["accept_all", "decisions_file"] = "accept_all"
    qc_files: list[str] = []


class AttributesConfig(Section):
    generation: GenerationSettings = GenerationSettings(max_new_tokens=16)
    images_per_unit: int = Field(64, ge=1)
    max_words: int = Field(6, ge=1)  # normalised answers are short phrases


class PromptsConfig(Section):
    """Subject filter and C_n / C_a / C_a+ prompt construction."""

    annotation_index: int | Literal["all"] = 0  # which OOPS! caption annotation(s) per clip
    exclude_test_clips: bool = True  # no identity may be in both splits
    extra_person_words: list[str] = []
    extra_non_person_words: list[str] = []


class GenerateConfig(Section):
    images_per_caption: int = Field(75, ge=1)
    images_per_unit: int = Field(25, ge=1)  # a unit is (prompt, chunk of indices): minutes of GPU time
    batch_size: int = Field(4, ge=1)
    steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.0, ge=0)
    height: int = Field(1024, ge=8)
    width: int = Field(1024, ge=8)
    # the paper is silent; default = the repository's own (RealVisXL V4.0: Euler); its model card recommends dpmpp_2m_karras, 25+ steps
    scheduler: Literal["default", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "ddim"] = "default"
    negative_prompt: str = Field("", pattern=r"^[^()\[\]]*$")  # no A1111 ( ) [ ] weighting: diffusers sends brackets as words
    prompt_prefix: str = Field("", pattern=r"^[^()\[\]]*$")
    prompt_suffix: str = Field("", pattern=r"^[^()\[\]]*$")
    black_threshold: float = Field(2.0, ge=0)  # mean pixel value below this = black image
    jpeg_quality: int = Field(95, ge=1, le=100)
    attention_slicing: bool = False
    content_filter: bool = True  # the safety checker (models.safety_checker) screens kept images: not in the paper
    vae_slicing: bool = False  # decode a batch one image at a time (the upcast float32 decode is the peak)
    channels_last: bool = False
    compile_unet: bool = False
    max_prompts: int | None = Field(None, ge=1)  # cap for small builds


class GenPoseConfig(Section):
    detect_resolution: int = Field(512, ge=32)
    image_resolution: int = Field(512, ge=32)
    batch_size: int = Field(8, ge=1)
    images_per_unit: int = Field(128, ge=1)
    require_person: bool = True
    min_keypoints: int = Field(8, ge=0)  # body keypoints found for the main person
    require_neck_and_hips: bool = True  # a body with no neck or no hip is broken
    max_limb_ratio: float = Field(2.5, gt=1)  # segment stretch above this = broken (docs/pose-rules.md)
    reject_detached_parts: bool = True  # neckless part groups on the person (a second head) = broken
    min_person_height: float = Field(0.2, ge=0)  # as pose.min_person_height
    network_height: int = Field(184, ge=32)  # as pose.network_height
    postprocess: Literal["torch", "controlnet_aux"] = "torch"  # as PoseConfig's


class ShardsConfig(Section):
    max_samples_per_shard: int = Field(1000, ge=1)
    max_bytes_per_shard: int = Field(1 << 30, ge=1024)  # below ~10 KiB (a tar's minimum) every sample is rejected, with that reason


class CMPConfig(Section):
    """CMP model/training; the paper's and official code's values in `full`."""

    image_size: int = Field(224, ge=16)
    max_text_len: int = Field(56, ge=4)
    embed_dim: int = Field(2048, ge=1)  # ITC embedding size (official 2048; the paper-head ablations used 256)
    itc_head: Literal["official", "paper"] = "official"  # official: pooled groups -> BN -> Dropout -> FC; paper: eq. 4
    itc_dropout: float = Field(0.5, ge=0, lt=1)  # dropout inside the official ITC head (official itc_dp)
    image_norm: Literal["clip", "processor"] = "clip"  # clip: CLIP mean/std (official); processor: the Swin processor's
    use_pose: bool = True  # PE: pose-aware image encoder
    use_ihnm: bool = True  # identity-based hard negatives in ITM
    batch_size: int = Field(22, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_end: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    # not strict: YAML and the JSON round trip give a list; each element is still a strict float
    betas: tuple[Annotated[float, Field(strict=True, ge=0, lt=1)], Annotated[float, Field(strict=True, ge=0, lt=1)]] = \
        Field((0.9, 0.98), strict=False)
    warmup_steps: int = Field(500, ge=0)
    epochs: int = Field(30, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many steps (smoke)
    temperature: float = Field(0.07, gt=0)
    itc_label_smoothing: float = Field(0.2, ge=0, lt=1)  # official label_smooth; 0 = the paper's plain InfoNCE
    eda_stream_weight: float = Field(0.8, ge=0)  # weight of ITC + ITM on a second, EDA-edited caption; 0 = off (EDA edits the caption itself)
    lr_schedule: Literal["step", "linear"] = "step"  # step: official scheduler.py; linear: warm-up then linear to lr_end
    lr_mult: float = Field(2.0, gt=0)  # learning-rate factor of the official init_params groups (1 = one lr)
    mlm_probability: float = Field(0.25, ge=0, le=1)
    mlm_max_masks: int | None = Field(10, ge=1)  # official: at most 10 whole-word/span masks per caption; None = per-token BERT masking
    pre_caption: bool = True  # official pre_caption: lower case, punctuation stripped, max_text_words words
    max_text_words: int = Field(56, ge=1)  # words kept by pre_caption (official max_words)
    pose_augment: Literal["own", "shared"] = "own"  # own: the pose map gets its own flip and erasing (official); shared: flipped with the image, never erased
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    train_fraction: float = Field(1.0, gt=0, le=1)
    rerank_k: int = Field(128, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    train_after_build: bool = True
    init_checkpoint: str | None = None  # whole-model init: the X-VLM / APTM person-search checkpoint, or a cmp.pth
    text_layers: int | None = Field(None, ge=1)  # BERT layers in the text encoder; None = first half (rest = cross encoder)
    pose_heads: int = Field(16, ge=1)  # heads of the pose-aware cross-attention (official: 16 for Swin-B's 1024)
    pose_stem_width: int = Field(96, ge=1)  # channels of the conv stem before the shared image encoder (official: 96)
    erasing_probability: float = Field(0.6, ge=0, le=1)  # random erasing on the image (official erasing_p)
    eda_probability: float = Field(1.0, ge=0, le=1)  # chance a caption gets one EDA edit (official eda_p 1 on the EDA stream)
    shuffle_buffer: int = Field(1000, ge=1)  # WebDataset sample shuffle buffer
    eval_batch_size: int = Field(64, ge=1)  # images / texts / re-ranked pairs per forward at evaluation
    figure_queries: int = Field(4, ge=0)  # queries drawn in the top-5 figure
    eval_combination: Literal["single", "official_4gpu"] = "single"  # official_4gpu: the official eval.py's scores on 4 processes


class PublishConfig(Section):
    url: str | None = None  # fsspec URL; None = do not publish
    storage_options: dict[str, Any] = {}  # never put secrets here: use the environment or blocks
    credentials_block: str | None = None  # name of a Prefect Secret block: JSON fsspec options (key, secret)
    force: bool = False  # publish even with failed units, an empty split or fewer samples than the release
    delete: bool = False  # remove remote shards the new index does not list (after it verified)

    # the JSON form (config.yaml, Prefect flow-run parameters, checkpoint metadata) never holds a
    # credential; the object itself keeps them for the publish step
    @field_serializer("url", "storage_options", when_used="json")
    def _redacted(self, value):
        return redact(value)


class CalibrateConfig(Section):  # `pab calibrate`: a pilot run on a sample (docs/DEPLOY.md)
    samples: int = Field(300, ge=1)  # OOPS! clips (two test frames each); about as many generated images
    images_per_prompt: int = Field(3, ge=1)  # generated images per sampled prompt (a build: images_per_caption)
    overrides: list[str] = []  # KEY=VALUE applied before --set (smoke: the synthetic OpenPose network)


class PABConfig(Section):
    profile: str
    run: RunConfig = RunConfig()
    fixtures: FixturesConfig = FixturesConfig()
    models: ModelsConfig
    oops: OopsConfig = OopsConfig()
    frames: FramesConfig = FramesConfig()
    pose: PoseConfig = PoseConfig()
    pairs: PairsConfig = PairsConfig()
    review: ReviewConfig = ReviewConfig()
    qc: QCConfig = QCConfig()
    test_captions: CaptionsConfig = CaptionsConfig()
    prompts: PromptsConfig = PromptsConfig()
    generate: GenerateConfig = GenerateConfig()
    gen_pose: GenPoseConfig = GenPoseConfig()
    train_captions: CaptionsConfig = CaptionsConfig()
    attributes: AttributesConfig = AttributesConfig()
    shards: ShardsConfig = ShardsConfig()
    cmp: CMPConfig = CMPConfig()
    publish: PublishConfig = PublishConfig()
    calibrate: CalibrateConfig = CalibrateConfig()

    @field_validator("profile")
    @classmethod
    def _profile_name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError("profile must be a plain name")
        return v

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections (dotted paths allowed): the part of the config a stage depends on."""
        data = self.model_dump(mode="json")
        return stable_hash({n: _get_dotted(data, n) for n in names})

    def to_yaml(self) -> str:
        """The resolved config as YAML, with anything that looks like a credential redacted."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)  # publish is redacted there
