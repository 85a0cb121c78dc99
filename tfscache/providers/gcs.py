"""Models from a Google Cloud Storage bucket laid out as TF Serving expects:
``gs://bucket/prefix/<name>/<version>/saved_model.pb``, ``.../variables/...``.

The client is ``google-cloud-storage``, Google's own and the best kept: it is blocking, like
boto3 and azure-storage-blob, so it runs in the object-store core's threads the same way
(an asyncio client such as gcloud-aio-storage would need an asyncio reactor and a second copy
path beside the core's).  Only its calls are here; listing, sizes, the parallel ranged
download with its one-pass check, staging, progress, timeout and cancellation are the core's
(``tfscache.providers.objectstore``).  An object's CRC32C (every object has one, and
google-crc32c computes it in hardware, several times cheaper than MD5) is checked; sizes
always.  Reads are pinned to the listed generation, so an object replaced mid-copy fails the
copy instead of mixing two contents.

Credentials: a service-account key file, else Application Default Credentials; ``anonymous``
for public buckets and emulators.  They are never logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tfscache.errors import Code, ServingError, not_found
from tfscache.providers.objectstore import MIB, ObjectStoreProvider, StoredObject, b64_digest

if TYPE_CHECKING:
    from tfscache.config import ProviderSettings

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
_LIST_FIELDS = "items(name,size,md5Hash,crc32c,generation,mediaLink,contentEncoding),prefixes,nextPageToken"


class GCSModelProvider(ObjectStoreProvider):
    kind = "gcs"
    label = "GCS"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        project: str | None = None,
        credentials_file: str | None = None,
        anonymous: bool = False,
        listing_ttl: float = 5.0,
        fetch_timeout: float = 600.0,
        max_concurrency: int = 8,
        chunk_size: int = 8 * MIB,
        progress_interval: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retry_timeout: float = 30.0,
        download_attempts: int = 3,
        verify_checksums: bool = True,
        reactor: Any,
        own_shutdown: bool = True,
        copy_threads: int = 4,
    ) -> None:
        if not bucket:
            raise ValueError("a GCS bucket is required")
        if anonymous and credentials_file:
            raise ValueError("anonymous and credentials_file exclude each other")
        super().__init__(
            bucket, prefix, listing_ttl=listing_ttl, fetch_timeout=fetch_timeout,
            max_concurrency=max_concurrency, multipart_threshold=chunk_size,
            progress_interval=progress_interval, download_attempts=download_attempts,
            verify_checksums=verify_checksums, reactor=reactor, own_shutdown=own_shutdown,
            copy_threads=copy_threads,
        )
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.project = project
        self.credentials_file = credentials_file
        self.anonymous = anonymous
        self.timeout = (connect_timeout, read_timeout)
        self.retry_timeout = retry_timeout
        self._gcs: Any = None
        self._retry: Any = None

    @classmethod
    def from_config(cls, p: ProviderSettings, reactor: Any, own_shutdown: bool = True) -> GCSModelProvider:
        """From the ``model_provider`` settings."""
        from tfscache.config import required

        g = p.gcs
        return cls(
            required(g.bucket, "model_provider.gcs.bucket"), g.prefix or "",
            endpoint_url=g.endpoint_url, project=g.project, credentials_file=g.credentials_file,
            anonymous=g.anonymous, listing_ttl=p.listing_ttl_seconds,
            fetch_timeout=p.fetch_timeout_seconds, max_concurrency=g.max_concurrency,
            chunk_size=g.chunk_size_bytes, progress_interval=g.progress_interval_seconds,
            verify_checksums=g.verify_checksums, copy_threads=p.copy_threads,
            read_timeout=min(30.0, p.fetch_timeout_seconds),
            retry_timeout=min(30.0, p.fetch_timeout_seconds),
            reactor=reactor, own_shutdown=own_shutdown,
        )

    def __repr__(self) -> str:  # never the credentials
        return f"GCSModelProvider(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint_url!r})"

    @property
    def where(self) -> str:
        return f"GCS bucket '{self.bucket}'"

    @property
    def location(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"

    # -- the client (built lazily, in a thread: ADC may touch files or the metadata server) ----
    def _client(self) -> Any:
        with self._client_lock:
            if self._gcs is None:
                import requests
                from google.api_core.retry import Retry
                from google.auth.transport.requests import AuthorizedSession
                from google.cloud import storage
                from google.cloud.storage.retry import _should_retry

                project = self.project
                if self.anonymous:
                    from google.auth.credentials import AnonymousCredentials

                    credentials: Any = AnonymousCredentials()
                    source = "anonymous"
                elif self.credentials_file:
                    from google.oauth2 import service_account

                    credentials = service_account.Credentials.from_service_account_file(
                        self.credentials_file, scopes=[READ_ONLY_SCOPE])
                    project = project or credentials.project_id
                    source = "key file"
                else:
                    import google.auth

                    credentials, found = google.auth.default(scopes=[READ_ONLY_SCOPE])
                    project = project or found
                    source = "application default"
                session = AuthorizedSession(credentials)
                adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, 2 * self.max_concurrency))
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                options = {"api_endpoint": self.endpoint_url} if self.endpoint_url else None
                self._gcs = storage.Client(project=project or "<none>", credentials=credentials,
                                           _http=session, client_options=options)
                # the library's default retries for up to 120 s; a copy has its own deadline
                self._retry = Retry(predicate=_should_retry, initial=0.2, maximum=2.0,
                                    multiplier=2.0, timeout=self.retry_timeout)
                self.log.info("GCS model source {location} endpoint={endpoint} credentials={source}",
                              location=self.location, endpoint=self.endpoint_url or "google",
                              source=source)
            return self._gcs

    # -- the object-store hooks ----------------------------------------------------------------
    def _list_children(self, prefix: str) -> Iterable[str]:
        client = self._client()
        blobs = client.list_blobs(self.bucket, prefix=prefix, delimiter="/", fields="prefixes,nextPageToken",
                                  timeout=self.timeout, retry=self._retry)
        for page in blobs.pages:
            for p in page.prefixes:
                yield p[len(prefix):].rstrip("/")

    def _list_objects(self, key_prefix: str) -> list[Any]:
        client = self._client()
        return list(client.list_blobs(self.bucket, prefix=key_prefix, fields=_LIST_FIELDS,
                                      timeout=self.timeout, retry=self._retry))

    def _object_info(self, raw: Any) -> StoredObject | None:
        if raw.name.endswith("/"):
            return None
        return StoredObject(raw.name, int(raw.size or 0), md5=b64_digest(raw.md5_hash),
                            crc32c=b64_digest(raw.crc32c), raw=raw)

    def _read(self, client: Any, obj: StoredObject, start: int, length: int, sink: Any,
              whole: bool) -> None:
        kw: dict[str, Any] = {} if whole else {"start": start, "end": start + length - 1}
        if obj.raw.generation:
            kw["if_generation_match"] = obj.raw.generation
        # raw: the stored bytes (the listed size), never decompressed on the way
        obj.raw.download_to_file(sink, client=client, raw_download=True, checksum=None,
                                 timeout=self.timeout, retry=self._retry, **kw)

    def _probe(self) -> None:
        client = self._client()
        blobs = client.list_blobs(self.bucket, prefix=self.prefix, max_results=1, fields="items(name)",
                                  timeout=self.timeout, retry=self._retry)
        list(blobs)

    def _close_client(self) -> None:
        gcs, self._gcs = self._gcs, None
        if gcs is not None:
            gcs.close()

    def _store_error(self, cause: BaseException, what: str, doing: str, name: str | None,
                     version: int | None) -> ServingError | None:
        import requests
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ga

        where = self.where
        if isinstance(cause, gx.RetryError) and cause.cause is not None:
            cause = cause.cause
        if isinstance(cause, gx.GoogleAPICallError) and cause.code is not None:
            status = int(cause.code)
            detail = self._scrub(f"{status}: {cause.message}")
            bucket_missing = "bucket" in (cause.message or "").lower()
            if status == 404 and (name is None or bucket_missing):
                return ServingError(Code.UNAVAILABLE, f"{where} does not exist ({doing} {what}; {detail})")
            if status == 404:
                return not_found(f"Servable not found for request: Specific({name}, {version})")
            if status == 412:
                return ServingError(
                    Code.UNAVAILABLE, f"An object of {what} in {where} changed while {doing} it; "
                    "the next request copies it again")
            if status == 401:
                return ServingError(
                    Code.UNAUTHENTICATED,
                    f"GCS refused the credentials while {doing} {what} from {where} ({detail}); "
                    "check model_provider.gcs.credentials_file or the application default credentials")
            if status == 403:
                return ServingError(
                    Code.PERMISSION_DENIED,
                    f"Access to {where} was denied while {doing} {what} ({detail}); check the "
                    "account's roles on the bucket (storage.objects.list and storage.objects.get)")
            if status >= 500 or status in (408, 429):
                return ServingError(Code.UNAVAILABLE, f"{where} is unavailable while {doing} {what} ({detail})")
            return ServingError(Code.INTERNAL, f"GCS error while {doing} {what} from {where}: {detail}")
        if isinstance(cause, ga.GoogleAuthError) or (
                isinstance(cause, (ValueError, OSError)) and self.credentials_file and self._gcs is None):
            # no credentials found, a key file that cannot be read or parsed, a refused refresh
            return ServingError(
                Code.UNAUTHENTICATED,
                f"No usable GCS credentials while {doing} {what} from {where}: set "
                "model_provider.gcs.credentials_file or the application default credentials "
                f"({type(cause).__name__})")
        if isinstance(cause, (requests.ConnectionError, requests.Timeout,
                              requests.exceptions.ChunkedEncodingError)):
            return ServingError(
                Code.UNAVAILABLE,
                f"Could not reach {where} at {self.endpoint_url or 'Google'} while {doing} {what}: "
                f"the connection failed ({type(cause).__name__})")
        return None
