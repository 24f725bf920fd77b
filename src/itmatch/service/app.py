"""The search service: JSON endpoints over one index, the index's pictures, and the web page, all
served by one FastAPI app (`itmatch serve`). The OpenAPI schema is at /openapi.json; there is no
/docs page, whose Swagger UI would load its scripts from a third-party CDN.

Every error is a JSON body {"error": message} with a 4xx status: 422 for a request outside the
limits or of the wrong type, 400 for a request the index cannot answer (an unknown image, an
explanation from a model that has none), 404 for an unknown path. Pictures are looked up by image
number only, and served only when the resolved path is a regular file inside the index's picture
folder (a symlink pointing elsewhere is a 404). With `allowed_hosts`, a request whose Host header
is none of them gets a 400: a page of another origin cannot read the index through DNS rebinding.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from itmatch.errors import ItmatchError
from itmatch.service.index import DEFAULT_MEMORY_MB, SearchIndex
from itmatch.service.search import can_explain, describe_image, explain_match, search_by_image, search_by_text

MAX_TEXT_LENGTH = 300  # characters of a sentence: captions are far shorter
MAX_K = 100
MAX_RERANK_K = 1000


class ErrorMessage(BaseModel):
    error: str


class Limits(BaseModel):
    max_text_length: int
    max_k: int
    max_rerank_k: int


class IndexInfo(BaseModel):
    images: int
    captions: int
    architecture: str
    preset: str
    explains: bool
    first_stage: bool
    first_stage_index: str
    removed: int
    default_rerank_k: int | None
    limits: Limits


class ImageHit(BaseModel):
    rank: int
    image: int
    id: str
    score: float


class TextSearch(BaseModel):
    query: str
    k: int
    rerank_k: int | None
    results: list[ImageHit]


class CaptionHit(BaseModel):
    rank: int
    caption: int
    text: str
    image: int
    score: float


class ImageSearch(BaseModel):
    image: int
    id: str
    k: int
    rerank_k: int | None
    results: list[CaptionHit]


class ImageInfo(BaseModel):
    image: int
    id: str
    name: str  # the photo's file name (else the id)
    captions: list[str]  # the captions written for it (none for photos indexed without captions)


class Region(BaseModel):
    box: list[float] | None  # x1, y1, x2, y2 as fractions of the picture; None: unknown
    confidence: float


class Word(BaseModel):
    word: str
    known: bool  # in the model's vocabulary
    attention: list[float]  # over the regions, in their order


class Explanation(BaseModel):
    image: int
    id: str
    text: str
    score: float
    regions: list[Region]
    words: list[Word]


ERRORS = {status: {"model": ErrorMessage} for status in (400, 404, 422)}
Text = Annotated[str, Query(min_length=1, max_length=MAX_TEXT_LENGTH, description="a sentence")]
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
RerankK = Annotated[
    int | None, Query(ge=1, le=MAX_RERANK_K, description="score only the first stage's top K (default: the server's)")
]
ImageNumber = Annotated[int, Query(ge=0, description="image number in the index")]
ImageInPath = Annotated[int, Path(ge=0, description="image number in the index")]


LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(
    index: SearchIndex, default_rerank_k: int | None = None, allowed_hosts: list[str] | None = None
) -> FastAPI:
    """The app of `index`; `allowed_hosts`: the Host header names it answers (None: any)."""
    app = FastAPI(
        title="itmatch search",
        description="Image-text search over an itmatch index.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    if allowed_hosts is not None:
        _check_host_header(app, allowed_hosts)
    _answer_errors_in_json(app)
    _add_web_page(app)
    _add_search_routes(app, index, default_rerank_k)
    _add_image_routes(app, index)
    return app


def _answer_errors_in_json(app: FastAPI) -> None:
    """Every error as {"error": message}: the one shape that the web page and other clients read."""

    @app.exception_handler(ItmatchError)
    def bad_request(request: Request, error: ItmatchError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)


def _add_web_page(app: FastAPI) -> None:
    page = resources.files("itmatch.service").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_page() -> str:
        return page


def _add_search_routes(app: FastAPI, index: SearchIndex, default_rerank_k: int | None) -> None:
    """/api/info and the endpoints that run the model: searches and explanations."""
    # One query at a time on the model: a single call already keeps every core busy.
    model_lock = threading.Lock()

    def rerank_k_or_default(rerank_k: int | None) -> int | None:
        return default_rerank_k if rerank_k is None else rerank_k

    @app.get("/api/info", response_model=IndexInfo)
    def info() -> dict:
        """What the index holds, and the limits of the other endpoints."""
        model = index.model
        return {
            "images": index.n_images,
            "captions": index.n_captions,
            "architecture": model.architecture,
            "preset": model.run_config.preset,
            "explains": can_explain(index),
            "first_stage": model.embedding_key is not None,
            "first_stage_index": index.spec.kind,
            "removed": len(index.removed),
            "default_rerank_k": default_rerank_k,
            "limits": {"max_text_length": MAX_TEXT_LENGTH, "max_k": MAX_K, "max_rerank_k": MAX_RERANK_K},
        }

    @app.get("/api/search/text", response_model=TextSearch, responses=ERRORS)
    def search_text(q: Text, k: TopK = 10, rerank_k: RerankK = None) -> dict:
        """The indexed images that best match a sentence, best first."""
        with model_lock:
            return search_by_text(index, q, k, rerank_k_or_default(rerank_k))

    @app.get("/api/search/image", response_model=ImageSearch, responses=ERRORS)
    def search_image(image: ImageNumber, k: TopK = 10, rerank_k: RerankK = None) -> dict:
        """The indexed captions that best describe an indexed image, best first."""
        with model_lock:
            return search_by_image(index, image, k, rerank_k_or_default(rerank_k))

    @app.get("/api/explain", response_model=Explanation, responses=ERRORS)
    def explain(image: ImageNumber, text: Text) -> dict:
        """Why an image and a sentence match: each region's confidence, each word's attention."""
        with model_lock:
            return explain_match(index, image, text)


def _add_image_routes(app: FastAPI, index: SearchIndex) -> None:
    """An indexed image's description and picture: read from the index, without the model."""

    @app.get("/api/images/{image}", response_model=ImageInfo, responses=ERRORS)
    def image_info(image: ImageInPath) -> dict:
        """An indexed image's id, file name and own captions."""
        return describe_image(index, image)

    @app.get("/api/images/{image}/thumbnail", response_class=FileResponse, responses=ERRORS)
    def thumbnail(image: ImageInPath) -> FileResponse:
        """The picture of an indexed image (JPEG, longest side 384 pixels)."""
        if image >= index.n_images or index.is_removed(image):
            raise HTTPException(404, f"no image {image} in the index: it has {index.n_images} images")
        return FileResponse(_picture_file(index, image), media_type="image/jpeg")


def _picture_file(index: SearchIndex, image: int) -> FilePath:
    """The picture's real path, if it is a regular file inside the index's picture folder."""
    folder = index.picture_path(0).parent.resolve()
    path = index.picture_path(image).resolve()
    if not (path.is_relative_to(folder) and path.is_file()):
        raise HTTPException(404, f"image {image} has no picture in the index folder")
    return path


def _check_host_header(app: FastAPI, allowed_hosts: list[str]) -> None:
    allowed = {name.lower() for name in allowed_hosts}

    @app.middleware("http")
    async def refuse_other_hosts(request: Request, call_next):
        host = request.headers.get("host", "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
        if name not in allowed:
            message = f"Host {host!r} is not served here; start `itmatch serve` with --allow-host {name or 'NAME'}"
            return JSONResponse({"error": message}, status_code=400)
        return await call_next(request)


def allowed_host_names(host: str, extra: list[str]) -> list[str]:
    """The bound address, its loopback names when it is one, and the --allow-host names."""
    names = [host, *extra]
    if host in LOOPBACK_NAMES or host.startswith("127."):
        names += LOOPBACK_NAMES
    return names


def serve(
    folder,
    host: str = "127.0.0.1",
    port: int = 8000,
    rerank_k: int | None = None,
    allow_hosts: list[str] = (),
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> None:
    """Runs the service on an index folder until interrupted."""
    import uvicorn

    if rerank_k is not None and not 1 <= rerank_k <= MAX_RERANK_K:
        raise ItmatchError(f"--rerank-k must be 1..{MAX_RERANK_K}, got {rerank_k}")
    index = SearchIndex.open(folder, memory_mb=memory_mb)
    app = create_app(index, rerank_k, allowed_host_names(host, list(allow_hosts)))
    print(f"itmatch search: {index.n_images:,} images; open http://{host}:{port}/ (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
