//! Compiles the example plugins in `plugins/` for wasm32-wasip2 and embeds
//! them, so `nudge` runs the example campaigns with no plugins folder.

include!("build_guests.rs");

const EXAMPLES: &[&str] = &[
    "cart-timer",
    "deposit-history",
    "first-identify",
    "mortgage-interest",
    "agent-script",
    "email",
    "sms",
    "webhook",
    "agent-queue",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let built = build_guests(EXAMPLES, &["plugins"]);
    let copied = copy_into(&built, &out.join("plugins"));
    let mut code = String::from("/// The example plugins, compiled for wasm32-wasip2.\n/// (name, component, manifest text)\npub const EMBEDDED: &[(&str, &[u8], &str)] = &[\n");
    let workspace =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("..");
    for (name, file) in &copied {
        let manifest = workspace
            .join("plugins")
            .join(name)
            .join("nudge-plugin.toml");
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        code.push_str(&format!(
            "    ({name:?}, include_bytes!({:?}), {text:?}),\n",
            file.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out.join("embedded.rs"), code).expect("writing embedded.rs");
}
