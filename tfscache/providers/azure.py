"""Models from an Azure Blob Storage container laid out as TF Serving expects:
``https://<account>.blob.core.windows.net/<container>/<prefix>/<name>/<version>/saved_model.pb``.

Only the ``azure-storage-blob`` calls are here; listing, sizes, the parallel ranged download
with its one-pass MD5 check, staging, progress, timeout and cancellation are the object-store
core's (``tfscache.providers.objectstore``).  A blob's Content-MD5, where it has one (Put Blob
uploads; the SDK's block uploads only when the uploader set it), is checked; sizes always.
Ranged reads of one blob carry ``If-Match`` with its listed ETag.

Credentials, in this order: a connection string; a SAS token; an account key (with the
account URL); else ``azure-identity``'s ``DefaultAzureCredential`` (environment, workload
identity, managed identity, Azure CLI...).  None is ever logged, and each is scrubbed from
error messages.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tfscache.errors import Code, ServingError, not_found
from tfscache.providers.objectstore import MIB, ObjectStoreProvider, StoredObject, b64_digest

if TYPE_CHECKING:
    from tfscache.config import ProviderSettings

_SECRET_PARTS_RE = re.compile(r"(?:AccountKey|SharedAccessSignature|sig)=([^;&]+)", re.IGNORECASE)

_DENIED_CODES = {
    "AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
    "AuthorizationSourceIPMismatch", "AuthorizationProtocolMismatch", "AuthorizationResourceTypeMismatch",
    "AuthorizationServiceMismatch", "InsufficientAccountPermissions", "AccountIsDisabled",
}


def account_name(account_url: str) -> str:
    """The storage account of an account URL: the host's first label, or for emulator-style
    URLs (an IP address or localhost) the first path segment."""
    u = urllib.parse.urlsplit(account_url)
    host = u.hostname or ""
    if host == "localhost" or re.fullmatch(r"[0-9.]+|\[?[0-9a-fA-F:]+\]?", host):
        return u.path.strip("/").split("/")[0]
    return host.split(".")[0]


class AzureBlobModelProvider(ObjectStoreProvider):
    kind = "azure"
    label = "Azure"

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        account_url: str | None = None,
        connection_string: str | None = None,
        sas_token: str | None = None,
        account_key: str | None = None,
        listing_ttl: float = 5.0,
        fetch_timeout: float = 600.0,
        max_concurrency: int = 8,
        chunk_size: int = 8 * MIB,
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
        if not container:
            raise ValueError("an Azure container is required")
        if sum(x is not None for x in (connection_string, sas_token, account_key)) > 1:
            raise ValueError("give one of connection_string, sas_token, account_key")
        if connection_string is None and not account_url:
            raise ValueError("an account URL is required without a connection string")
        super().__init__(
            container, prefix, listing_ttl=listing_ttl, fetch_timeout=fetch_timeout,
            max_concurrency=max_concurrency, multipart_threshold=chunk_size,
            progress_interval=progress_interval, download_attempts=download_attempts,
            verify_checksums=verify_md5, reactor=reactor, own_shutdown=own_shutdown,
            copy_threads=copy_threads,
        )
        self.container = container
        self.account_url = account_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self._credentials = (connection_string, sas_token, account_key)
        for secret in self._credentials:
            if secret:
                self._secrets.add(secret)
                self._secrets |= set(_SECRET_PARTS_RE.findall(secret))
                self._secrets.add(urllib.parse.quote(secret, safe=""))
        self._service: Any = None
        self._containers: Any = None
        self._source = ("connection string" if connection_string else "SAS token" if sas_token
                        else "account key" if account_key else "DefaultAzureCredential")

    @classmethod
    def from_config(cls, p: ProviderSettings, reactor: Any, own_shutdown: bool = True) -> AzureBlobModelProvider:
        """From the ``model_provider`` settings."""
        from tfscache.config import required

        a = p.azure
        return cls(
            required(a.container, "model_provider.azure.container"), a.prefix or "",
            account_url=a.account_url, connection_string=a.connection_string,
            sas_token=a.sas_token, account_key=a.account_key,
            listing_ttl=p.listing_ttl_seconds, fetch_timeout=p.fetch_timeout_seconds,
            max_concurrency=a.max_concurrency, chunk_size=a.chunk_size_bytes,
            progress_interval=a.progress_interval_seconds, verify_md5=a.verify_md5,
            copy_threads=p.copy_threads, read_timeout=min(30.0, p.fetch_timeout_seconds),
            reactor=reactor, own_shutdown=own_shutdown,
        )

    def __repr__(self) -> str:  # never the credentials
        return (f"AzureBlobModelProvider(account_url={self.account_url!r}, container={self.container!r}, "
                f"prefix={self.prefix!r})")

    @property
    def where(self) -> str:
        return f"Azure container '{self.container}'"

    @property
    def location(self) -> str:
        return f"{self.account_url or 'azure'}/{self.container}/{self.prefix}"

    # -- the client (built lazily, in a thread: DefaultAzureCredential may touch files/IMDS) --
    def _client(self) -> Any:
        with self._client_lock:
            if self._containers is None:
                import requests
                from azure.core.pipeline.transport import RequestsTransport
                from azure.storage.blob import BlobServiceClient, ExponentialRetry

                connection_string, sas_token, account_key = self._credentials
                session = requests.Session()
                adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, 2 * self.max_concurrency))
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                options: dict[str, Any] = dict(
                    # one request per range: the core runs the ranges in parallel
                    max_single_get_size=self.multipart_threshold,
                    max_chunk_get_size=self.multipart_threshold,
                    # the SDK's default waits 15 s, then 18 s, 24 s... between attempts (its
                    # stubs say int; the waits are floats)
                    retry_policy=ExponentialRetry(initial_backoff=0.5, increment_base=2,  # type: ignore[arg-type]
                                                  retry_total=max(0, self.max_attempts - 1),
                                                  random_jitter_range=0.5),  # type: ignore[arg-type]
                    transport=RequestsTransport(session=session, session_owner=True,
                                                connection_timeout=self.connect_timeout,
                                                read_timeout=self.read_timeout),
                    user_agent="tfscache",
                )
                if connection_string:
                    service = BlobServiceClient.from_connection_string(connection_string, **options)
                    self.account_url = self.account_url or service.url.rstrip("/")
                else:
                    credential: Any
                    if sas_token:
                        credential = sas_token.lstrip("?")
                    elif account_key:
                        credential = {"account_name": account_name(self.account_url or ""),
                                      "account_key": account_key}
                    else:
                        from azure.identity import DefaultAzureCredential

                        credential = DefaultAzureCredential()
                    service = BlobServiceClient(self.account_url or "", credential=credential, **options)
                self._service = service
                self._containers = service.get_container_client(self.container)
                self.log.info("Azure model source {location} credentials={source}",
                              location=self.location, source=self._source)
            return self._containers

    # -- the object-store hooks ----------------------------------------------------------------
    def _list_children(self, prefix: str) -> Iterable[str]:
        from azure.storage.blob import BlobPrefix

        for item in self._client().walk_blobs(name_starts_with=prefix, delimiter="/"):
            if isinstance(item, BlobPrefix):
                yield item.name[len(prefix):].rstrip("/")

    def _list_objects(self, key_prefix: str) -> list[Any]:
        return list(self._client().list_blobs(name_starts_with=key_prefix, include=["metadata"]))

    def _object_info(self, raw: Any) -> StoredObject | None:
        if raw.name.endswith("/") or (raw.metadata or {}).get("hdi_isfolder") == "true":
            return None  # a directory marker; in ADLS Gen2 (hierarchical) accounts, a directory
        settings = raw.content_settings
        return StoredObject(raw.name, int(raw.size),
                            md5=b64_digest(settings.content_md5 if settings else None), raw=raw)

    def _read(self, client: Any, obj: StoredObject, start: int, length: int, sink: Any,
              whole: bool) -> None:
        from azure.core import MatchConditions

        kw: dict[str, Any] = {}
        if obj.raw.etag:
            kw.update(etag=obj.raw.etag, match_condition=MatchConditions.IfNotModified)
        downloader = client.get_blob_client(obj.key).download_blob(
            offset=start, length=length, max_concurrency=1, validate_content=False, **kw)
        for chunk in downloader.chunks():
            sink.write(chunk)

    def _probe(self) -> None:
        pages = self._client().list_blobs(name_starts_with=self.prefix, results_per_page=1).by_page()
        next(iter(pages), None)

    def _close_client(self) -> None:
        service, self._service, self._containers = self._service, None, None
        if service is not None:
            service.close()

    def _store_error(self, cause: BaseException, what: str, doing: str, name: str | None,
                     version: int | None) -> ServingError | None:
        from azure.core import exceptions as ax

        where = self.where
        if isinstance(cause, ax.HttpResponseError) and cause.status_code is not None:
            code = str(getattr(cause, "error_code", None) or "")
            status = cause.status_code
            detail = self._scrub(f"{code or status}: {cause.reason or ''}".rstrip(": "))
            if code == "ContainerNotFound" or (status == 404 and name is None):
                return ServingError(Code.UNAVAILABLE, f"{where} does not exist ({doing} {what}; {detail})")
            if status == 404 and name is not None:
                return not_found(f"Servable not found for request: Specific({name}, {version})")
            if status in (412, 409) and code in ("ConditionNotMet", "TargetConditionNotMet", ""):
                return ServingError(
                    Code.UNAVAILABLE, f"A blob of {what} in {where} changed while {doing} it; "
                    "the next request copies it again")
            if code in _DENIED_CODES or status in (401, 403):
                hint = ("check the SAS token's permissions (read and list) and the role assignments"
                        if code == "AuthorizationPermissionMismatch" else "check the credentials")
                return ServingError(
                    Code.PERMISSION_DENIED,
                    f"Access to {where} was denied while {doing} {what} ({detail}); {hint}")
            if status >= 500 or status in (408, 429):
                return ServingError(Code.UNAVAILABLE, f"{where} is unavailable while {doing} {what} ({detail})")
            return ServingError(Code.INTERNAL, f"Azure error while {doing} {what} from {where}: {detail}")
        if isinstance(cause, ax.ClientAuthenticationError):  # no status: the credential itself
            return ServingError(
                Code.UNAUTHENTICATED,
                f"No usable Azure credentials while {doing} {what} from {where}: set "
                "model_provider.azure.connection_string, sas_token or account_key, or configure "
                f"DefaultAzureCredential ({type(cause).__name__})")
        if isinstance(cause, (ax.ServiceRequestError, ax.ServiceResponseError, ax.IncompleteReadError)):
            return ServingError(
                Code.UNAVAILABLE,
                f"Could not reach {where} at {self.account_url or 'Azure'} while {doing} {what}: "
                f"the connection failed ({type(cause).__name__})")
        return None
