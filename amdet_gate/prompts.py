"""Clean prompts for the scan: a built-in text-to-image style corpus, or a user file.

The built-in corpus is generated deterministically from the word lists below (our own,
public domain) and shipped as package data (`data/prompts.txt`), so that a scan never
depends on the network. `python -m amdet_gate.prompts` regenerates the file; a test checks
that the shipped file equals the generator's output.
"""

from __future__ import annotations

import hashlib
import random
from importlib import resources
from pathlib import Path

from amdet_gate.errors import UsageError
from amdet_gate.files import read_capped_text

SUBJECTS = (
    "cat", "dog", "horse", "owl", "fox", "wolf", "bear", "rabbit", "deer", "eagle",
    "whale", "dolphin", "octopus", "turtle", "lion", "tiger", "elephant", "giraffe",
    "penguin", "parrot", "butterfly", "dragon", "unicorn", "robot", "astronaut", "knight",
    "wizard", "sailor", "farmer", "dancer", "musician", "chef", "old man", "young woman",
    "child", "monk", "pirate", "samurai", "scientist", "painter", "lighthouse", "castle",
    "cathedral", "bridge", "windmill", "cottage", "skyscraper", "temple", "train", "bicycle",
    "sailboat", "airship", "car", "motorcycle", "tractor", "spaceship", "submarine",
    "hot air balloon", "teapot", "violin", "piano", "clock", "lantern", "chair", "bookshelf",
    "typewriter", "camera", "guitar", "vase of flowers", "bowl of fruit", "cup of coffee",
    "loaf of bread", "birthday cake", "pizza", "sunflower", "rose", "oak tree", "cactus",
    "mushroom", "waterfall", "mountain", "volcano", "island", "river", "forest", "desert",
    "glacier", "canyon", "meadow", "village", "city street", "market", "harbor", "garden",
    "library", "kitchen", "classroom", "train station", "greenhouse", "ancient ruin",
)

ADJECTIVES = (
    "red", "blue", "green", "golden", "silver", "tiny", "giant", "ancient", "futuristic",
    "cozy", "abandoned", "glowing", "wooden", "crystal", "rusty", "fluffy", "majestic",
    "sleepy", "colorful", "mysterious", "snowy", "floating", "mechanical", "cheerful",
    "lonely", "elegant", "weathered", "shiny", "striped", "spotted", "steampunk", "neon",
    "paper", "marble", "clay", "velvet", "frozen", "burning", "translucent", "miniature",
)

SETTINGS = (
    "in a misty forest", "on a sunny beach", "under a starry sky", "in the rain",
    "at sunset", "at dawn", "in a snowy field", "on a busy street", "in a quiet library",
    "on top of a hill", "by a calm lake", "in an old kitchen", "inside a glass dome",
    "on the moon", "in outer space", "underwater", "in a flower field", "in a dark cave",
    "at a night market", "in a cyberpunk city", "in a medieval town", "on a mountain peak",
    "in a desert oasis", "beside a river", "in a jungle", "on a rooftop", "in a museum",
    "in a train carriage", "on a wooden table", "in a living room", "at the harbor",
    "in autumn leaves", "during a thunderstorm", "in a foggy valley", "on a frozen lake",
    "in a bamboo grove", "on a windy cliff", "in a candlelit room", "at a carnival",
    "in a greenhouse", "", "", "", "", "",
)

STYLES = (
    "oil painting", "watercolor", "digital art", "photograph", "pencil sketch",
    "3d render", "anime style", "pixel art", "studio photo", "concept art", "charcoal drawing",
    "impressionist painting", "low poly", "ink illustration", "vintage poster",
    "children's book illustration", "cinematic still", "macro photograph", "isometric art",
    "stained glass", "ukiyo-e print", "claymation", "pastel drawing", "comic book panel",
    "art nouveau", "film photograph", "matte painting", "line art", "surreal painting",
    "", "", "", "",
)

DETAILS = (
    "highly detailed", "soft lighting", "dramatic lighting", "volumetric light", "8k",
    "trending on artstation", "warm colors", "muted colors", "high contrast", "shallow depth of field",
    "wide angle", "close up", "bokeh", "golden hour", "symmetrical composition", "sharp focus",
    "moody atmosphere", "vibrant colors", "intricate details", "soft shadows", "rim light",
    "cinematic composition", "award winning", "masterpiece", "film grain", "hyperrealistic",
    "octane render", "unreal engine", "studio lighting", "pastel palette", "long exposure",
    "aerial view", "from below", "minimalist", "dreamy", "whimsical", "epic scale", "foggy",
    "ray tracing", "natural light", "morning light", "evening glow", "overcast sky",
    "reflections on water", "detailed textures", "clean background", "dynamic pose",
)

FRAMES = (
    "{a} {adj} {subject} {setting}",
    "a {style} of {a} {adj} {subject} {setting}",
    "{a} {subject} {setting}, {style}, {detail}",
    "{a} {adj} {subject}, {style}",
    "portrait of {a} {adj} {subject}, {detail}",
    "{a} {adj} {subject} and {a2} {subject2} {setting}",
    "a photo of {a} {subject} {setting}",
    "{style} of {a} {subject}, {detail}, {detail2}",
)

CORPUS_SIZE = 5000
GENERATOR_SEED = 20260101


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _tidy(text: str) -> str:
    # Empty slots leave doubled spaces and dangling commas behind.
    parts = [p.strip() for p in text.split(",")]
    text = ", ".join(p for p in parts if p)
    return " ".join(text.split())


def generate_corpus(size: int = CORPUS_SIZE, seed: int = GENERATOR_SEED) -> list[str]:
    """Deterministically generate `size` distinct prompts."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < size:
        adj, subject = rng.choice(ADJECTIVES), rng.choice(SUBJECTS)
        subject2 = rng.choice(SUBJECTS)
        slots = {
            "adj": adj,
            "subject": subject,
            "subject2": subject2,
            "a": _article(adj),
            "a2": _article(subject2),
            "setting": rng.choice(SETTINGS),
            "style": rng.choice(STYLES) or "painting",
            "detail": rng.choice(DETAILS),
            "detail2": rng.choice(DETAILS),
        }
        frame = rng.choice(FRAMES)
        if "{a} {subject}" in frame:
            slots["a"] = _article(subject)
        # Real text-to-image prompts trail a list of modifiers; 0-6 of them here.
        extras = rng.sample(DETAILS, rng.choice((0, 1, 2, 3, 3, 4, 4, 5, 6)))
        prompt = _tidy(", ".join([frame.format(**slots), *extras]))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def builtin_prompts() -> list[str]:
    """The shipped corpus (package data), one prompt per line."""
    text = resources.files("amdet_gate").joinpath("data/prompts.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and duplicates dropped, order kept."""
    text = read_capped_text(path, MAX_PROMPT_FILE_BYTES, "prompt file", UsageError)
    prompts = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if len(prompts) < 20:
        raise UsageError(f"prompt file {path} has {len(prompts)} distinct prompts; at least 20 needed")
    return prompts


if __name__ == "__main__":
    out = Path(__file__).parent / "data" / "prompts.txt"
    out.write_text("\n".join(generate_corpus()) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def prompts_identity(path: Path | None) -> str:
    """sha256 of the prompt set a scan would use (part of the verdict cache key)."""
    prompts = read_prompt_file(path) if path is not None else builtin_prompts()
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
