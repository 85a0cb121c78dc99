"""Models from an S3 bucket (AWS S3, MinIO, Ceph, R2...) laid out as TF Serving expects:
``s3://bucket/prefix/<name>/<version>/saved_model.pb``, ``.../variables/...``, ``.../assets/...``.

Only the boto3 calls are here; listing, sizes, the parallel ranged download with its one-pass
MD5 check, staging, progress, timeout and cancellation are the object-store core's
(``tfscache.providers.objectstore``).  An object's ETag is its MD5 when it was uploaded in one
PUT (not multipart, not SSE-KMS/SSE-C): then the MD5 is checked, sizes always.  Ranged reads
of one object carry ``If-Match`` with its listed ETag, so an object replaced mid-copy fails the
copy instead of mixing two contents.

Credentials: boto3's standard chain unless ``access_key_id``/``secret_access_key`` are given.
They are never logged and are scrubbed from every error message.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tfscache.errors import Code, ServingError, not_found
from tfscache.providers.objectstore import (
    MIB,
    ObjectStoreProvider,
    StoredObject,
    normalize_prefix,
    safe_parts,
)

if TYPE_CHECKING:
    from tfscache.config import ProviderSettings

__all__ = ["S3ModelProvider", "normalize_prefix", "safe_parts"]

_MD5_RE = re.compile(r"[0-9a-f]{32}")
_READ_CHUNK = 1 * MIB

# S3 error codes that mean "you may not", whatever the HTTP status says
_DENIED_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem",
    "InvalidSecurity", "RequestTimeTooSkewed", "403", "Forbidden", "AuthorizationHeaderMalformed",
    "XMinioAccessKeyDisabled", "XAmzContentSHA256Mismatch",
}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500",
    "XMinioServerNotInitialized", "XMinioStorageFull", "OperationAborted", "Throttling",
}


class S3ModelProvider(ObjectStoreProvider):
    kind = "s3"
    label = "S3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        listing_ttl: float = 5.0,
        fetch_timeout: float = 600.0,
        max_concurrency: int = 8,
        multipart_threshold: int = 8 * MIB,
        progress_interval: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        download_attempts: int = 3,
        verify_md5: bool = True,
        reactor: Any,
        own_shutdown: bool = True,
        copy_threads: int = 4,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket is required")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        super().__init__(
            bucket, prefix, listing_ttl=listing_ttl, fetch_timeout=fetch_timeout,
            max_concurrency=max_concurrency, multipart_threshold=multipart_threshold,
            progress_interval=progress_interval, download_attempts=download_attempts,
            verify_checksums=verify_md5, reactor=reactor, own_shutdown=own_shutdown,
            copy_threads=copy_threads,
        )
        self.bucket = bucket
        self.region = region
        self.endpoint_url = endpoint_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.verify_md5 = verify_md5  # model_provider.s3.verify_md5; bench/ measures what it costs
        self._keys = (access_key_id, secret_access_key)
        self._secrets |= {s for s in self._keys if s}
        self._s3: Any = None

    @classmethod
    def from_config(cls, p: ProviderSettings, reactor: Any, own_shutdown: bool = True) -> S3ModelProvider:
        """From the ``model_provider`` settings."""
        from tfscache.config import required

        s3 = p.s3
        return cls(
            required(s3.bucket, "model_provider.s3.bucket"),
            s3.prefix or "",
            region=s3.region,
            endpoint_url=s3.endpoint_url,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
            listing_ttl=p.listing_ttl_seconds,
            fetch_timeout=p.fetch_timeout_seconds,
            max_concurrency=s3.max_concurrency,
            multipart_threshold=s3.multipart_threshold_bytes,
            progress_interval=s3.progress_interval_seconds,
            copy_threads=p.copy_threads,
            verify_md5=s3.verify_md5,
            # a read that stalls longer than a whole copy may take is not worth waiting for: a
            # source that accepts and never answers frees the pool thread that soon
            read_timeout=min(30.0, p.fetch_timeout_seconds),
            reactor=reactor,
            own_shutdown=own_shutdown,
        )

    def __repr__(self) -> str:  # never the credentials
        return f"S3ModelProvider(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint_url!r})"

    @property
    def where(self) -> str:
        return f"S3 bucket '{self.bucket}'"

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # -- the client (built lazily, in a thread: the credential chain may touch files/IMDS) --
    def _client(self) -> Any:
        with self._client_lock:
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                access, secret = self._keys
                session = boto3.session.Session(
                    aws_access_key_id=access, aws_secret_access_key=secret,
                    region_name=self.region,
                )
                config = Config(
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    retries={"max_attempts": self.max_attempts, "mode": "standard"},
                    max_pool_connections=max(10, 2 * self.max_concurrency),
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                    user_agent_extra="tfscache",
                )
                client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
                creds = session.get_credentials()
                if creds is not None:
                    frozen = creds.get_frozen_credentials()
                    self._secrets |= {s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s}
                self._s3 = client
                self.log.info(
                    "S3 model source {location} endpoint={endpoint} credentials={source}",
                    location=self.location, endpoint=self.endpoint_url or "aws",
                    source="config" if access else (getattr(creds, "method", None) or "none found"),
                )
            return self._s3

    # -- the object-store hooks ----------------------------------------------------------------
    def _list_children(self, prefix: str) -> Iterable[str]:
        pages = self._client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes") or ():
                yield cp["Prefix"][len(prefix):].rstrip("/")

    def _list_objects(self, key_prefix: str) -> list[dict[str, Any]]:
        """Every object below a prefix, directory markers (keys ending in '/') left out."""
        out = []
        pages = self._client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key_prefix)
        for page in pages:
            for o in page.get("Contents") or ():
                if not o["Key"].endswith("/"):
                    out.append(o)
        return out

    def _object_info(self, raw: dict[str, Any]) -> StoredObject | None:
        if raw["Key"].endswith("/"):
            return None
        etag = (raw.get("ETag") or "").strip('"').lower()
        md5 = bytes.fromhex(etag) if _MD5_RE.fullmatch(etag) else None  # not 'md5-of-md5s-N'
        return StoredObject(raw["Key"], int(raw["Size"]), md5=md5, raw=raw)

    def _read(self, client: Any, obj: StoredObject, start: int, length: int, sink: Any,
              whole: bool) -> None:
        kw: dict[str, Any] = {}
        if not whole:
            kw["Range"] = f"bytes={start}-{start + length - 1}"
            if obj.raw.get("ETag"):
                kw["IfMatch"] = obj.raw["ETag"]
        body = client.get_object(Bucket=self.bucket, Key=obj.key, **kw)["Body"]
        try:
            for chunk in body.iter_chunks(_READ_CHUNK):
                sink.write(chunk)
        finally:
            body.close()

    def _retryable(self, error: BaseException) -> bool:
        from botocore import exceptions as bx
        from urllib3 import exceptions as ux

        return isinstance(error, (
            bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError,
            bx.ConnectionClosedError, ux.ProtocolError, ux.ReadTimeoutError, socket.timeout,
        ))

    def _mismatch_explained(self, client: Any, obj: StoredObject) -> bool:
        # SSE-KMS and SSE-C objects have ETags that are not the MD5 of the content
        head = client.head_object(Bucket=self.bucket, Key=obj.key)
        return head.get("ServerSideEncryption") == "aws:kms" or bool(head.get("SSECustomerAlgorithm"))

    def _probe(self) -> None:
        self._client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def _close_client(self) -> None:
        s3, self._s3 = self._s3, None
        if s3 is not None and hasattr(s3, "close"):
            s3.close()

    def _store_error(self, cause: BaseException, what: str, doing: str, name: str | None,
                     version: int | None) -> ServingError | None:
        from botocore import exceptions as bx

        where = self.where
        if isinstance(cause, bx.ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = self._scrub(f"{code}: {err.get('Message') or status}")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and version is None):
                return ServingError(
                    Code.UNAVAILABLE, f"{where} does not exist ({doing} {what}; {detail})")
            if code in ("NoSuchKey", "404", "NotFound") and name is not None:
                return not_found(f"Servable not found for request: Specific({name}, {version})")
            if code in ("PreconditionFailed", "412"):
                return ServingError(
                    Code.UNAVAILABLE, f"An object of {what} in {where} changed while {doing} it; "
                    "the next request copies it again")
            if code in _DENIED_CODES or status == 403:
                return ServingError(
                    Code.PERMISSION_DENIED,
                    f"Access to {where} was denied while {doing} {what} ({detail}); check the "
                    "credentials and the bucket policy",
                )
            if code in _TRANSIENT_CODES or (status or 0) >= 500:
                return ServingError(
                    Code.UNAVAILABLE, f"{where} is unavailable while {doing} {what} ({detail})")
            return ServingError(Code.INTERNAL, f"S3 error while {doing} {what} from {where}: {detail}")
        if isinstance(cause, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return ServingError(
                Code.UNAUTHENTICATED,
                f"No usable S3 credentials while {doing} {what}: set model_provider.s3."
                "access_key_id/secret_access_key or the standard AWS credential chain",
            )
        unreachable = (
            bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
            bx.ResponseStreamingError, bx.IncompleteReadError, ConnectionError, TimeoutError,
        )
        if isinstance(cause, unreachable) or self._retryable(cause):
            return ServingError(
                Code.UNAVAILABLE,
                f"Could not reach {where} at {self.endpoint_url or 'AWS'} while {doing} {what}: "
                f"the connection failed ({type(cause).__name__})",
            )
        return None
