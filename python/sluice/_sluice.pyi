# Types of the native module (python/src/lib.rs).
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyarrow as pa

__version__: str

class SluiceError(Exception): ...

class PipelineError(SluiceError):
    file: Optional[str]
    line: Optional[int]
    column: Optional[int]
    message: Optional[str]
    hint: Optional[str]

class NotFound(SluiceError): ...

class NativePipeline:
    def __init__(self, path: str) -> None: ...
    @property
    def path(self) -> str: ...
    def explain(self) -> str: ...
    def views(self) -> List[Dict[str, Any]]: ...
    def training_set(
        self,
        spine: Any,
        features: List[str],
        key_map: Dict[str, str],
        time_column: Optional[str],
        sources: List[str],
        closed_windows: bool,
        dead_letters: str,
    ) -> Tuple[pa.Table, Dict[str, Any]]: ...
    def backfill(
        self,
        sources: List[str],
        start: Optional[str],
        end: Optional[str],
        state_dir: str,
        online: bool,
        include_late: bool,
        replace: bool,
        threads: Optional[int],
        progress: Optional[Callable[[str, int, Optional[int], bool], None]],
    ) -> Dict[str, Any]: ...

def read_online(
    state_dir: str, view: str, keys: List[str], window: Optional[str] = None
) -> List[Optional[str]]: ...
