//! `mmkd serve MODEL`: the model behind the OpenAI-compatible chat-completions API.

use anyhow::Result;
use clap::Args;

use crate::prompt::PromptLayout;
use crate::serve::Server;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Checkpoint directory or hub id.
    pub model: String,
    /// Port (0: a free one, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on: loopback unless you mean to expose the model.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Conversation template (default: the one the model was trained with, else `plain`).
    #[arg(long)]
    pub template: Option<String>,
    /// The name `/v1/models` lists and responses carry (default: MODEL).
    #[arg(long)]
    pub name: Option<String>,
    /// `max_tokens` of a request that gives none.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::runtime::DeviceSpec,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut options =
        crate::models::llava::BuildOptions::new(crate::models::llava::Trainable::NONE, 0);
    options.device = args.device.open()?;
    let bundle = crate::checkpoint::LoadedModel::load(&args.model, &options)?;
    let template = PromptLayout::choose(&bundle, args.template.as_deref())?;
    let name = args.name.clone().unwrap_or_else(|| args.model.clone());
    let server = Server::new(bundle, template, name, args.max_tokens);
    server.run(&format!("{}:{}", args.host, args.port), |addr| {
        // One line a script (or a test) can wait for.
        println!("serving {} at http://{addr}/v1", args.model);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
}
