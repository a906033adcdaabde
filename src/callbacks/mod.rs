//! Callback delivery (being written on its own branch; this is the interface).

pub mod ssrf {
    //! URL checks.
    /// Why a callback URL is refused.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct CallbackUrlError(pub String);
    /// Checks a callback URL.
    pub async fn check_url(url: &str, _allow_private: bool) -> Result<url::Url, CallbackUrlError> {
        url::Url::parse(url).map_err(|e| CallbackUrlError(e.to_string()))
    }
}

/// The dispatcher's handle.
#[derive(Clone, Debug)]
pub struct DispatcherHandle {
    /// Wakes the dispatcher.
    pub notify: std::sync::Arc<tokio::sync::Notify>,
}

impl DispatcherHandle {
    /// A callback became due.
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}
