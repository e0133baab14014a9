"""The synthetic "shapes" world: small scenes of coloured shapes, what they show and what can be
asked about them; the files written from them are owl.data.shapes_files.

A scene holds one to `max_shapes` shapes (circle, square, triangle), each in its own colour slot at
its own position (left, right, top, bottom, centre) on a plain background (`sample_scene`,
`render_scene`); its reference captions (`captions`) and the questions it answers unambiguously
(`qa_pairs`, `yes_no_pairs`). Besides: small deterministic text-only tasks (`text_task`) and tiny
videos of one shape moving across the frame (`Motion`, `render_motion`, `motion_questions`).
Everything is drawn from a `random.Random` the caller passes.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
# Centre of each position as a fraction of the image side.
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "centre": (0.5, 0.5),
}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (225, 230, 240))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
VQA_SUFFIX = "Answer the question using a single word or phrase."
# Facts for the text-only tasks: small enough for a tiny model to learn.
WORLD_COLOURS = {
    "sky": "blue",
    "grass": "green",
    "sun": "yellow",
    "snow": "white",
    "coal": "black",
    "cherry": "red",
    "orange": "orange",
    "plum": "purple",
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    position: str  # a key of POSITIONS


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: int  # index into BACKGROUNDS
    scale: float  # shape size as a fraction of the image side

    @property
    def layout(self) -> frozenset[Shape]:
        """What the scene shows, ignoring rendering details: held-out scenes differ in this."""
        return frozenset(self.shapes)


def sample_scene(rng: random.Random, max_shapes: int) -> Scene:
    num = rng.randint(1, max_shapes)
    positions = rng.sample(sorted(POSITIONS), num)
    shapes = tuple(
        Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), pos) for pos in sorted(positions)
    )
    return Scene(shapes, background=rng.randrange(len(BACKGROUNDS)), scale=rng.uniform(0.22, 0.3))


def render_scene(scene: Scene, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    half = scene.scale * size / 2
    for shape in scene.shapes:
        _draw(draw, shape, POSITIONS[shape.position], size, half)
    return image


def _draw(
    draw: ImageDraw.ImageDraw, shape: Shape, centre: tuple[float, float], size: int, half: float
) -> None:
    """One shape with its centre at `centre` (fractions of the side), `half` pixels each way."""
    cx, cy = centre[0] * size, centre[1] * size
    box = (cx - half, cy - half, cx + half, cy + half)
    colour = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse(box, fill=colour)
    elif shape.kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)


# How captions and questions name each position.
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom", "centre": "in the centre"}  # fmt: skip


def _where(position: str) -> str:
    return WHERE[position]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene) -> list[str]:
    """Reference captions (colour, shape, position and count), the first one is the canonical one."""
    items = [f"{_article(s.colour)} {s.colour} {s.kind} {_where(s.position)}" for s in scene.shapes]
    num = len(scene.shapes)
    count = f"{NUMBER_WORDS[num]} shape{'s' if num > 1 else ''}"
    return [
        f"{count}: {_join(items)}.",
        f"{_join(items).capitalize()}.",
        f"A picture of {count}, {_join(items)}.",
    ]


def qa_pairs(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously: (kind, question, short answer)."""
    num = len(scene.shapes)
    pairs = [("count", "How many shapes are there?", str(num))]
    for s in scene.shapes:
        where = _where(s.position)
        pairs.append(("shape", f"What shape is {where}?", s.kind))
        pairs.append(("colour", f"What colour is the shape {where}?", s.colour))
        same = [t for t in scene.shapes if (t.kind, t.colour) == (s.kind, s.colour)]
        if len(same) == 1:
            pairs.append(("position", f"Where is the {s.colour} {s.kind}?", s.position))
    for kind in SHAPES:
        n = sum(s.kind == kind for s in scene.shapes)
        pairs.append(("count", f"How many {kind}s are there?", str(n)))
    for colour in sorted({s.colour for s in scene.shapes}):
        n = sum(s.colour == colour for s in scene.shapes)
        pairs.append(("count", f"How many {colour} shapes are there?", str(n)))
    return pairs


def pick_question(pairs: list[tuple[str, str, str]], rng: random.Random) -> tuple[str, str, str]:
    """A question whose kind is drawn uniformly first: `qa_pairs` holds many count questions whose
    answer is nearly always "1" or "0", which would let a blind model score well."""
    kind = rng.choice(sorted({k for k, _, _ in pairs}))
    return rng.choice([p for p in pairs if p[0] == kind])


def yes_no_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    present = rng.choice(scene.shapes)
    absent_colour = rng.choice(
        [c for c in sorted(COLOURS) if c not in {s.colour for s in scene.shapes}]
    )
    return [
        ("yes_no", f"Is there {_article(present.colour)} {present.colour} {present.kind}?", "yes"),
        ("yes_no", f"Is there {_article(absent_colour)} {absent_colour} {present.kind}?", "no"),
    ]


# ---- text-only tasks -------------------------------------------------------------------------


def text_task(rng: random.Random) -> dict[str, str]:
    """One Alpaca record of a small deterministic task: letter order, a fact, or reading a word
    out of the input. Chosen so that a ~1M-parameter model learns them in the demo's minutes
    (counting and reversing words took far longer than the demo has)."""
    kind = rng.randrange(5)
    words = [rng.choice(sorted(WORLD_COLOURS)) for _ in range(rng.randint(2, 5))]
    if kind == 0:
        letter = rng.choice(string.ascii_lowercase[:-1])
        return {"instruction": f"What letter comes after {letter}?", "input": "",
                "output": chr(ord(letter) + 1)}  # fmt: skip
    if kind == 1:
        letter = rng.choice(string.ascii_lowercase[1:])
        return {"instruction": f"What letter comes before {letter}?", "input": "",
                "output": chr(ord(letter) - 1)}  # fmt: skip
    if kind == 2:
        return {"instruction": "What is the first word of the text?", "input": " ".join(words),
                "output": words[0]}  # fmt: skip
    if kind == 3:
        thing = words[0]
        return {"instruction": f"What colour is the {thing}?", "input": "",
                "output": WORLD_COLOURS[thing]}  # fmt: skip
    return {"instruction": "What is the last word of the text?", "input": " ".join(words),
            "output": words[-1]}  # fmt: skip


def alpaca_prompt(record: dict[str, str]) -> str:
    """The user turn as `owl.data.sources` builds it from an Alpaca record (eval asks the same)."""
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


# ---- videos ----------------------------------------------------------------------------------

# Direction -> where the shape's centre goes, as fractions of the side: (start, end) per axis.
MOVES = {
    "right": ((0.2, 0.5), (0.8, 0.5)),
    "left": ((0.8, 0.5), (0.2, 0.5)),
    "down": ((0.5, 0.2), (0.5, 0.8)),
    "up": ((0.5, 0.8), (0.5, 0.2)),
}


@dataclass(frozen=True)
class Motion:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    direction: str  # a key of MOVES
    background: int  # index into BACKGROUNDS


def sample_motion(rng: random.Random) -> Motion:
    return Motion(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(MOVES)),
                  rng.randrange(len(BACKGROUNDS)))  # fmt: skip


def render_motion(motion: Motion, size: int, num_frames: int) -> list[Image.Image]:
    """The frames of `motion`: the shape's centre goes in a straight line from start to end."""
    (x0, y0), (x1, y1) = MOVES[motion.direction]
    shape = Shape(motion.kind, motion.colour, "centre")
    frames = []
    for i in range(num_frames):
        t = i / (num_frames - 1)
        frame = Image.new("RGB", (size, size), BACKGROUNDS[motion.background])
        centre = (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        _draw(ImageDraw.Draw(frame), shape, centre, size, 0.3 * size / 2)
        frames.append(frame)
    return frames


def motion_questions(motion: Motion) -> list[tuple[str, str]]:
    """(question, short answer) pairs a video of `motion` answers; the first is the direction."""
    return [
        (f"Which way does the {motion.colour} {motion.kind} move?", motion.direction),
        ("What shape moves?", motion.kind),
        ("What colour is the moving shape?", motion.colour),
    ]
