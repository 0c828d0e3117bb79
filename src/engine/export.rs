//! Exports (docs/export-format.md): one JSON document in the chosen format, streamed from one
//! consistent snapshot straight into the writer, optionally compressed, hashed and counted on the
//! fly. No table is ever held in memory. Each format's document is written by its own module.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::AsyncWrite;

use super::Error;
use super::destination::Destination;
use super::format::writer::{Measure, Output};
use super::framework::ExportFormat;
use super::io::Observed;
use super::store::Store;
use super::transfer::{ExportOptions, ExportReport};

impl Store {
    /// Streams an export of the store into `writer` from one REPEATABLE READ snapshot: the file
    /// is consistent while writers go on, and nothing waits on the export. Returns the writer,
    /// shut down (an upload is complete once this returns).
    pub async fn export<W: AsyncWrite + Unpin + Send>(
        &self,
        writer: W,
        options: &ExportOptions,
    ) -> Result<(ExportReport, W), Error> {
        let started = Instant::now();
        let profile = self.profile();
        if !profile.supports_format(options.format) {
            return Err(profile.unsupported_format(options.format));
        }
        if options.format == ExportFormat::Exact && options.environments.is_some() {
            return Err(Error::InvalidExportRequest(
                "an exact export always holds every table; choose environments with the \
                 statekeeper or sqlmesh format"
                    .into(),
            ));
        }
        let mut tx = self.begin_snapshot().await?;
        sqlx::query("SET TRANSACTION READ ONLY")
            .execute(&mut *tx)
            .await?;
        let measure = Arc::new(Mutex::new(Measure::default()));
        let mut out = Output::new(
            writer,
            options.compression,
            &options.recipients,
            measure.clone(),
        )?;
        let mut report = ExportReport {
            framework: self.framework(),
            format: options.format,
            compression: options.compression,
            encrypted_to: options.recipients.len() as u64,
            ..Default::default()
        };
        match options.format {
            ExportFormat::Exact => {
                super::exact::write(self, &mut tx, &mut out, &mut report).await?
            }
            ExportFormat::Statekeeper => {
                super::frameworks::statekeeper::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
            ExportFormat::Meltano => {
                super::frameworks::meltano::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
            ExportFormat::MeltanoBackend => {
                return Err(Error::InvalidExportRequest(
                    "the meltano-backend format is a folder of files, not one stream: export it \
                     to a folder or object prefix"
                        .into(),
                ));
            }
            ExportFormat::Sqlmesh => {
                super::frameworks::sqlmesh::export::write(
                    self,
                    &mut tx,
                    &mut out,
                    &mut report,
                    options,
                )
                .await?
            }
        }
        tx.commit().await?;
        let writer = out.finish().await?;
        let (bytes, sha256) = std::mem::take(
            &mut *measure
                .lock()
                .map_err(|_| Error::ExportWrite("checksum state poisoned".into()))?,
        )
        .finish();
        report.bytes = bytes;
        report.sha256 = Some(sha256);
        report.duration = started.elapsed();
        Ok((report, writer))
    }
}

impl Store {
    /// Exports into `destination`. The object appears under its final name only once complete
    /// (a local file is written beside it, synced and renamed; S3, GCS and Azure commit the
    /// upload at the end): a failed export leaves no half-written file and no pending multipart
    /// upload behind. `observe` sees every byte written (progress).
    pub async fn export_to(
        &self,
        destination: &Destination,
        options: &ExportOptions,
        observe: impl FnMut(&[u8]) + Unpin + Send,
    ) -> Result<ExportReport, Error> {
        let upload = destination.begin_upload().await?;
        self.export_upload(destination, upload, options, observe)
            .await
    }

    /// [`Store::export_to`] into an upload the caller began (and whose staging id it recorded).
    pub async fn export_upload(
        &self,
        destination: &Destination,
        upload: crate::engine::destination::Upload,
        options: &ExportOptions,
        observe: impl FnMut(&[u8]) + Unpin + Send,
    ) -> Result<ExportReport, Error> {
        let mut upload = Observed::new(upload, observe);
        match self.export(&mut upload, options).await {
            Ok((report, _)) => Ok(report),
            Err(e) => {
                upload.inner.abort().await;
                Err(match e {
                    Error::ExportWrite(reason) => Error::ExportWrite(format!(
                        "{}: {}",
                        destination.url(),
                        destination.redact(&reason)
                    )),
                    other => other,
                })
            }
        }
    }
}
