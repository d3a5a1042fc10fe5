"""Draw docs/img/face.png: the face task's mechanics on the astronaut photo (tests/data/face, public domain).

Panels: the photo with the detected faces and landmarks | the aligned crop with each landmark's arrow to its target
(the reference is the same photo sheared) | the aligned reference with its landmarks | the photo with the bundled
shapes model's edit put back. The bundled model knows only coloured shapes, so the last panel shows where the edit
lands and how it is composited, not a meaningful face edit. Needs the `face` extra. Run from the repository root.
"""

import numpy as np
from PIL import Image, ImageDraw

from dragondiff import DragonPipeline
from dragondiff import face as F

photo = np.asarray(Image.open("tests/data/face/astronaut.jpg").convert("RGB"))
reference = np.asarray(Image.fromarray(photo).transform((512, 512), Image.AFFINE, (1, 0.08, -10, 0, 1, 0),
                                                         Image.BILINEAR))
pipe = DragonPipeline.bundled()
out = pipe.reshape_face(photo, reference=reference, face=0, reference_face=0, preset="fast")
S = 384


def dots(image, points, colour, r=2):
    d = ImageDraw.Draw(image)
    for x, y in points:
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return image


faces = F.detect(photo)
p1 = Image.fromarray(photo)
d = ImageDraw.Draw(p1)
for k, f in enumerate(faces):
    d.rectangle(f.box, outline=(255, 255, 0) if k == 0 else (128, 128, 128), width=2)
    d.text((f.box[0], f.box[3] + 2), f"#{k} {f.score:.2f}", fill=(255, 255, 0))
dots(p1, faces[0].landmarks, (255, 0, 0))
crop, _ = F.align(photo, faces[0].landmarks)
k = S / crop.shape[0]
p2 = Image.fromarray(crop).resize((S, S), Image.LANCZOS)
d = ImageDraw.Draw(p2)
for (hx, hy), (tx, ty) in zip(out.landmarks["handles"] * k, out.landmarks["targets"] * k):
    d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=2)
dots(p2, out.landmarks["handles"] * k, (0, 0, 255))
dots(p2, out.landmarks["targets"] * k, (255, 0, 0))
p3 = dots(out.reference_image.resize((S, S), Image.LANCZOS), out.landmarks["targets"] * k, (255, 0, 0))
p4 = out.photo
sheet = Image.new("RGB", (4 * S + 30, S), "white")
for i, p in enumerate((p1, p2, p3, p4)):
    sheet.paste(p.resize((S, S), Image.LANCZOS), (i * (S + 10), 0))
sheet.save("docs/img/face.png")
print("docs/img/face.png", out.seconds)
